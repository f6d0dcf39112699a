//! The subscription API (`/api/v1/webhooks`, bearer API keys), the delivery
//! log, and the deliverer's health and metrics endpoints.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde_json::{json, Map, Value};

use super::guard::{self, UrlPolicy};
use super::metrics::DeliveryMetrics;
use super::queue::{Queue, QueuedEvent};
use super::replay::{Replays, Window};
use super::subscription::{self, rfc3339, Subscription, SubscriptionCache, SubscriptionStore};
use super::worker::Deliverer;
use crate::api::{error, prometheus, readiness, with_json_fallbacks};
use crate::bearer::{unauthorized, BearerKeys};
use crate::consume::Health;

/// Shared state of the handlers.
pub struct ApiState {
    /// Subscriptions.
    pub subs: SubscriptionStore,
    /// The replica's copy, refreshed after every change.
    pub cache: Arc<SubscriptionCache>,
    /// Jobs and the delivery log.
    pub queue: Queue,
    /// Replays of subscriptions' history.
    pub replays: Replays,
    /// Makes test attempts.
    pub deliverer: Deliverer,
    /// The configured sources' names (a subscription's `source` is one).
    pub sources: Vec<String>,
    /// Accepted bearer keys.
    pub api_keys: BearerKeys,
    /// Callback URL policy.
    pub policy: UrlPolicy,
    /// Default rotation grace period.
    pub rotation_grace_secs: u64,
    /// Metrics.
    pub metrics: Arc<DeliveryMetrics>,
    /// Health flags.
    pub health: Arc<Health>,
}

/// A rejected request body: 400 for bad JSON, 422 naming the field.
struct BadRequest {
    field: Option<String>,
    message: String,
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        match self.field {
            None => error(StatusCode::BAD_REQUEST, "invalid_json", &self.message),
            Some(field) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(
                    json!({"error": "validation_failed", "field": field, "message": self.message}),
                ),
            )
                .into_response(),
        }
    }
}

impl BadRequest {
    /// 422 naming `field`.
    fn field(field: &str, message: &str) -> Self {
        Self {
            field: Some(field.to_owned()),
            message: message.to_owned(),
        }
    }
}

fn invalid(field: &str, message: &str) -> Response {
    BadRequest::field(field, message).into_response()
}

fn redis_down() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "redis_unavailable",
        "the subscription store is unavailable; retry",
    )
}

/// Builds the router.
pub fn app(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/v1/webhooks", post(create).get(list))
        .route(
            "/api/v1/webhooks/{id}",
            get(read).patch(update).delete(remove),
        )
        .route("/api/v1/webhooks/{id}/rotate-secret", post(rotate))
        .route("/api/v1/webhooks/{id}/recover", post(recover))
        .route("/api/v1/webhooks/{id}/test", post(test))
        .route(
            "/api/v1/webhooks/{id}/replay",
            post(replay).get(replay_status),
        )
        .route("/api/v1/webhooks/{id}/deliveries", get(deliveries))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(64 * 1024));
    let router = Router::new()
        .merge(api)
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    with_json_fallbacks(router)
}

/// `Authorization: Bearer <key>` against every configured key, in constant time.
async fn authorize(State(s): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if !s.api_keys.accept(req.headers()) {
        return unauthorized();
    }
    next.run(req).await
}

fn parse_object(body: &Bytes) -> Result<Map<String, Value>, BadRequest> {
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => return Ok(m),
        Ok(_) => "the body must be a JSON object".to_owned(),
        Err(e) => format!("the body is not valid JSON: {e}"),
    };
    Err(BadRequest {
        field: None,
        message,
    })
}

fn string_field<'a>(m: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, BadRequest> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(BadRequest {
            field: Some(name.to_owned()),
            message: format!("{name} must be a string"),
        }),
    }
}

/// The fields of a subscription a request sets, each checked; absent ones
/// are `None`.
struct Fields<'a> {
    event_type: Option<&'a str>,
    source: Option<&'a str>,
    callback_url: Option<&'a str>,
    description: Option<&'a str>,
    enabled: Option<bool>,
}

impl<'a> Fields<'a> {
    /// Reads the fields of `m`; `allowed` are the ones the call takes, any
    /// other is refused by name, as is a value of the wrong JSON type.
    fn read(m: &'a Map<String, Value>, allowed: &[&str]) -> Result<Fields<'a>, BadRequest> {
        if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(BadRequest::field(k, &format!("unknown field {k:?}")));
        }
        let fields = Fields {
            event_type: string_field(m, "event_type")?,
            source: string_field(m, "source")?,
            callback_url: string_field(m, "callback_url")?,
            description: string_field(m, "description")?,
            enabled: match m.get("enabled") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => {
                    return Err(BadRequest::field(
                        "enabled",
                        "enabled must be true or false",
                    ))
                }
            },
        };
        Ok(fields)
    }

    /// Checks the values given: the event type pattern, the source (one of
    /// `sources`, or `""` for any), the callback URL against the SSRF
    /// policy (resolving its host), the description's length.
    async fn check(&self, policy: UrlPolicy, sources: &[String]) -> Result<(), BadRequest> {
        if let Some(Err(why)) = self.event_type.map(subscription::validate_pattern) {
            return Err(BadRequest::field("event_type", &why));
        }
        if let Some(source) = self.source.filter(|s| !s.is_empty()) {
            if !sources.iter().any(|s| s == source) {
                let why = format!("unknown source; configured: {}", sources.join(", "));
                return Err(BadRequest::field("source", &why));
            }
        }
        if let Some(url) = self.callback_url {
            if let Err(why) = guard::check_url_resolving(url, policy).await {
                return Err(BadRequest::field("callback_url", &why));
            }
        }
        if self.description.is_some_and(|d| d.len() > 500) {
            return Err(BadRequest::field(
                "description",
                "description is longer than 500 characters",
            ));
        }
        Ok(())
    }
}

async fn create(State(s): State<Arc<ApiState>>, body: Bytes) -> Response {
    let m = match parse_object(&body) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let allowed = ["event_type", "source", "callback_url", "description"];
    let fields = match Fields::read(&m, &allowed) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let Some(event_type) = fields.event_type else {
        return invalid("event_type", "event_type is required");
    };
    let Some(callback_url) = fields.callback_url else {
        return invalid("callback_url", "callback_url is required");
    };
    if let Err(r) = fields.check(s.policy, &s.sources).await {
        return r.into_response();
    }
    let description = fields.description;
    let sub = Subscription {
        id: subscription::new_id(),
        event_type: event_type.to_owned(),
        source: fields.source.filter(|s| !s.is_empty()).map(str::to_owned),
        callback_url: callback_url.to_owned(),
        description: description.map(str::to_owned),
        created_at_ms: chrono::Utc::now().timestamp_millis(),
        secret: subscription::new_secret(),
        previous_secret: None,
        disabled: None,
        failing_since_ms: None,
    };
    if s.subs.create(&sub).await.is_err() {
        return redis_down();
    }
    let _ = s.cache.refresh(&s.subs).await;
    tracing::info!(subscription = %sub.id, event_type = %sub.event_type, "Subscription created.");
    let mut body = sub.public_json();
    // Shown once: only a rotation issues it again (a new one).
    body["secret"] = json!(sub.secret.expose_secret());
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn list(State(s): State<Arc<ApiState>>) -> Response {
    match s.subs.list().await {
        Ok(subs) => Json(json!({
            "webhooks": subs.iter().map(Subscription::public_json).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(_) => redis_down(),
    }
}

async fn read(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.subs.get(&id).await {
        Ok(Some(sub)) => Json(sub.public_json()).into_response(),
        Ok(None) => not_found(),
        Err(_) => redis_down(),
    }
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "unknown_webhook",
        "no such webhook subscription",
    )
}

async fn remove(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.subs.delete(&id).await {
        Ok(true) => {
            let _ = s.queue.drop_subscription(&id).await;
            let _ = s.cache.refresh(&s.subs).await;
            tracing::info!(subscription = %id, "Subscription deleted.");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => not_found(),
        Err(_) => redis_down(),
    }
}

/// `PATCH`: changes the callback URL, event type or description, and
/// disables (`"enabled": false`, reason `manual`) or re-enables a
/// subscription, e.g. one disabled after its endpoint answered 410 or kept
/// failing. Its id and secret stay; re-enabled, it gets the events received
/// from then on (`…/replay` queues those of the time it was disabled).
async fn update(State(s): State<Arc<ApiState>>, Path(id): Path<String>, body: Bytes) -> Response {
    let m = match parse_object(&body) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    let allowed = [
        "event_type",
        "source",
        "callback_url",
        "description",
        "enabled",
    ];
    let fields = match Fields::read(&m, &allowed) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = fields.check(s.policy, &s.sources).await {
        return r.into_response();
    }
    let mut change = subscription::Change::default();
    for (name, value) in [
        ("event_type", fields.event_type),
        ("source", fields.source),
        ("callback_url", fields.callback_url),
        ("description", fields.description),
    ] {
        if let Some(v) = value {
            change.set.push((name, v.to_owned()));
        }
    }
    match fields.enabled {
        Some(true) => change.enable(),
        Some(false) => change.disable(chrono::Utc::now().timestamp_millis(), "manual"),
        None => {}
    }
    if change.is_empty() {
        return invalid(
            "body",
            "nothing to change: give event_type, callback_url, description or enabled",
        );
    }
    match s.subs.update(&id, &change).await {
        Ok(true) => {}
        Ok(false) => return not_found(),
        Err(_) => return redis_down(),
    }
    let _ = s.cache.refresh(&s.subs).await;
    let changed: Vec<&str> = m.keys().map(String::as_str).collect();
    tracing::info!(subscription = %id, changed = ?changed, "Subscription updated.");
    match s.subs.get(&id).await {
        Ok(Some(sub)) => Json(sub.public_json()).into_response(),
        Ok(None) => not_found(),
        Err(_) => redis_down(),
    }
}

async fn rotate(State(s): State<Arc<ApiState>>, Path(id): Path<String>, body: Bytes) -> Response {
    let mut grace = s.rotation_grace_secs;
    if !body.is_empty() {
        let m = match parse_object(&body) {
            Ok(m) => m,
            Err(r) => return r.into_response(),
        };
        match m.get("grace_period_secs") {
            None => {}
            Some(v) => match v.as_u64() {
                Some(g) if g <= 7 * 24 * 3600 => grace = g,
                _ => {
                    return invalid(
                        "grace_period_secs",
                        "grace_period_secs must be an integer from 0 to 604800",
                    )
                }
            },
        }
    }
    let secret = subscription::new_secret();
    let until = chrono::Utc::now().timestamp_millis() + (grace as i64) * 1000;
    match s.subs.rotate(&id, &secret, until).await {
        Ok(true) => {
            let _ = s.cache.refresh(&s.subs).await;
            tracing::info!(subscription = %id, grace_secs = grace, "Secret rotated.");
            Json(json!({
                "id": id,
                "secret": secret.expose_secret(),
                "previous_secret_expires_at": rfc3339(until),
            }))
            .into_response()
        }
        Ok(false) => not_found(),
        Err(_) => redis_down(),
    }
}

/// Puts the subscription's dead letters back in its queue: those given up
/// since `since` (RFC 3339; absent: every one still kept), e.g. after its
/// endpoint was fixed. Each is attempted again with the full retry schedule
/// and the same `webhook-id`. A disabled subscription must be enabled first.
async fn recover(State(s): State<Arc<ApiState>>, Path(id): Path<String>, body: Bytes) -> Response {
    let mut since_ms = 0;
    if !body.is_empty() {
        let m = match parse_object(&body) {
            Ok(m) => m,
            Err(r) => return r.into_response(),
        };
        if let Some(k) = m.keys().find(|k| k.as_str() != "since") {
            return invalid(k, &format!("unknown field {k:?}"));
        }
        match time_field(&m, "since") {
            Ok(since) => since_ms = since.unwrap_or(0),
            Err(r) => return r.into_response(),
        }
    }
    match s.subs.get(&id).await {
        Ok(Some(sub)) if sub.disabled.is_some() => return disabled(),
        Ok(Some(_)) => {}
        Ok(None) => return not_found(),
        Err(_) => return redis_down(),
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    match s.queue.recover(&id, since_ms, now_ms).await {
        Ok(done) => {
            s.metrics.recovered(done.requeued);
            tracing::info!(subscription = %id, requeued = done.requeued, expired = done.expired, "Dead letters recovered.");
            Json(json!({"id": id, "requeued": done.requeued, "expired": done.expired}))
                .into_response()
        }
        Err(_) => redis_down(),
    }
}

/// Queues again the events received in a time window that match the
/// subscription and that it never got (from before it was created, or from
/// while it was disabled): `{"since", "until"?}` (RFC 3339; `until`
/// defaults to now). Runs in the background: 202, then `GET` the same path.
async fn replay(State(s): State<Arc<ApiState>>, Path(id): Path<String>, body: Bytes) -> Response {
    let m = match parse_object(&body) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    if let Some(k) = m.keys().find(|k| !["since", "until"].contains(&k.as_str())) {
        return invalid(k, &format!("unknown field {k:?}"));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (since_ms, until_ms) = match (time_field(&m, "since"), time_field(&m, "until")) {
        (Ok(Some(since)), Ok(until)) => (since, until.unwrap_or(now_ms).min(now_ms)),
        (Ok(None), _) => return invalid("since", "since is required"),
        (Err(r), _) | (_, Err(r)) => return r.into_response(),
    };
    if since_ms > until_ms {
        return invalid("since", "since must not be after until (or now)");
    }
    let sub = match s.subs.get(&id).await {
        Ok(Some(sub)) if sub.disabled.is_some() => return disabled(),
        Ok(Some(sub)) => sub,
        Ok(None) => return not_found(),
        Err(_) => return redis_down(),
    };
    let window = Window { since_ms, until_ms };
    match s.replays.start(sub, window).await {
        Ok(true) => (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "state": "running", "since": rfc3339(since_ms), "until": rfc3339(until_ms)})),
        )
            .into_response(),
        Ok(false) => error(
            StatusCode::CONFLICT,
            "replay_running",
            "a replay of this subscription is running; see GET …/replay",
        ),
        Err(_) => redis_down(),
    }
}

/// The latest replay of the subscription: state (running, done, failed),
/// its window, records scanned and jobs queued.
async fn replay_status(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.replays.status(&id).await {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "no_replay",
            "no replay of this subscription is known",
        ),
        Err(_) => redis_down(),
    }
}

/// Sends one signed test event (`hooklog.test`) to the subscription's
/// endpoint now, as a delivery would be sent, and answers with what the
/// receiver did; for checking a receiver's signature verification before
/// real traffic, or an endpoint before enabling it again. Nothing is queued
/// or retried.
async fn test(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    let sub = match s.subs.get(&id).await {
        Ok(Some(sub)) => sub,
        Ok(None) => return not_found(),
        Err(_) => return redis_down(),
    };
    let now_ms = chrono::Utc::now().timestamp_millis();
    let event_id = format!("test_{}", subscription::new_id().trim_start_matches("sub_"));
    let body = json!({
        "type": TEST_EVENT_TYPE,
        "event_type": TEST_EVENT_TYPE,
        "subscription_id": id,
        "sent_at": rfc3339(now_ms),
    });
    let event = QueuedEvent {
        event_id: event_id.clone(),
        event_type: TEST_EVENT_TYPE.to_owned(),
        body: body.to_string().into_bytes(),
        traceparent: String::new(),
    };
    let probe = s.deliverer.probe(&sub, &event).await;
    tracing::info!(subscription = %id, delivered = probe.delivered, status = ?probe.status, error = ?probe.error, "Test event sent.");
    Json(json!({
        "id": id,
        "event_id": event_id,
        "delivered": probe.delivered,
        "status_code": probe.status,
        "error": probe.error,
        "latency_ms": probe.latency.as_millis() as u64,
    }))
    .into_response()
}

/// The event type of test events.
const TEST_EVENT_TYPE: &str = "hooklog.test";

/// An optional RFC 3339 field as Unix ms.
fn time_field(m: &Map<String, Value>, name: &str) -> Result<Option<i64>, BadRequest> {
    let Some(text) = string_field(m, name)? else {
        return Ok(None);
    };
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|_| {
            BadRequest::field(
                name,
                &format!("{name} must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z"),
            )
        })
}

fn disabled() -> Response {
    error(
        StatusCode::CONFLICT,
        "webhook_disabled",
        "the subscription is disabled: enable it first (PATCH with {\"enabled\": true})",
    )
}

async fn deliveries(State(s): State<Arc<ApiState>>, Path(id): Path<String>) -> Response {
    match s.subs.get(&id).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found(),
        Err(_) => return redis_down(),
    }
    match (s.queue.recent(&id, 100).await, s.queue.pending(&id).await) {
        (Ok(log), Ok(pending)) => {
            Json(json!({"id": id, "pending": pending, "deliveries": log})).into_response()
        }
        _ => redis_down(),
    }
}

async fn readyz(State(s): State<Arc<ApiState>>) -> Response {
    readiness(&s.health, s.subs.get("_ping").await.is_ok())
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    prometheus(s.metrics.render())
}
