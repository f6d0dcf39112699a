//! The dispatcher and the attempts: claims due jobs per subscription (never
//! more than the endpoint's concurrency, so a slow or failing endpoint only
//! ever holds its own slots), POSTs the raw body with signatures, and acts
//! on the verdict: done, retry later, dead-letter, or disable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hooklog_schemas::{headers, topics};
use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::guard::{self, GuardedResolver, UrlPolicy};
use super::metrics::DeliveryMetrics;
use super::policy::{self, Verdict};
use super::queue::{AttemptLog, Queue, QueuedEvent};
use super::sign;
use super::subscription::{rfc3339, Subscription, SubscriptionCache, SubscriptionStore};
use crate::changelog::Publisher;
use crate::config::DeliveryConfig;

/// Response bytes read (then discarded, never logged).
const MAX_RESPONSE_BYTES: usize = 4096;

/// How long a job whose body found no room among the bodies in flight
/// waits before it is claimed again (unattempted).
const NO_ROOM_DELAY_MS: i64 = 250;

/// Delivery settings derived from `[delivery]`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Retry delays.
    pub schedule_secs: Vec<u64>,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Attempts in flight per subscription.
    pub endpoint_concurrency: usize,
    /// Attempts in flight in all.
    pub max_in_flight: usize,
    /// Bytes of bodies in flight in all.
    pub max_in_flight_bytes: usize,
    /// Disable an endpoint failing this long.
    pub disable_after: Duration,
    /// URL policy.
    pub policy: UrlPolicy,
}

impl From<&DeliveryConfig> for Settings {
    fn from(c: &DeliveryConfig) -> Self {
        Self {
            schedule_secs: c.retry_schedule_secs.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
            endpoint_concurrency: c.endpoint_concurrency,
            max_in_flight: c.max_in_flight,
            max_in_flight_bytes: c.max_in_flight_bytes,
            disable_after: Duration::from_secs(c.disable_after_failing_secs),
            policy: UrlPolicy {
                allow_http: c.allow_http,
                allow_private: c.allow_private_networks,
            },
        }
    }
}

/// Builds the HTTP client: no redirects, guarded DNS, https-only unless allowed.
pub fn client(settings: &Settings) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private: settings.policy.allow_private,
        }))
        .https_only(!settings.policy.allow_http)
        .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("hooklog/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Everything an attempt needs.
#[derive(Clone)]
pub struct Deliverer {
    /// Subscriptions.
    pub subs: SubscriptionStore,
    /// Shared subscription copy.
    pub cache: Arc<SubscriptionCache>,
    /// Jobs.
    pub queue: Queue,
    /// HTTP client.
    pub client: reqwest::Client,
    /// DLQ producer.
    pub publisher: Publisher,
    /// Metrics.
    pub metrics: Arc<DeliveryMetrics>,
    /// Settings.
    pub settings: Arc<Settings>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// What a test attempt got (`POST /api/v1/webhooks/{id}/test`).
#[derive(Debug)]
pub struct Probe {
    /// The receiver answered 2xx.
    pub delivered: bool,
    /// HTTP status, when it answered.
    pub status: Option<u16>,
    /// Error class when it did not (timeout, connect, blocked_address…).
    pub error: Option<&'static str>,
    /// How long the attempt took.
    pub latency: Duration,
}

impl Deliverer {
    /// One signed POST of `event` to `sub`, exactly as a delivery would be
    /// sent, but outside the queue: nothing is retried, logged,
    /// dead-lettered or counted against the subscription's health.
    pub async fn probe(&self, sub: &Subscription, event: &QueuedEvent) -> Probe {
        let started = Instant::now();
        let (verdict, status, error) = self.send(sub, event).await;
        Probe {
            delivered: matches!(verdict, Verdict::Delivered),
            status,
            error,
            latency: started.elapsed(),
        }
    }

    /// Claims and runs due jobs until `shutdown`; `wake` cuts the idle wait.
    pub async fn dispatch(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let global = Arc::new(Semaphore::new(self.settings.max_in_flight));
        // One permit a byte of the bodies being delivered.
        let room = Arc::new(Semaphore::new(self.settings.max_in_flight_bytes));
        let mut slots: HashMap<String, Arc<Semaphore>> = HashMap::new();
        // An attempt outliving its lease may run twice; keep it well above
        // the timeout.
        let lease_ms = self.settings.timeout.as_millis() as i64 + 30_000;
        while !shutdown.is_cancelled() {
            if now_ms() - self.cache.loaded_at_ms() > 1000 {
                if let Err(e) = self.cache.refresh(&self.subs).await {
                    warn!(error = %e, "Redis unavailable; delivery waits.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let subs = self.cache.snapshot();
            slots.retain(|id, _| subs.iter().any(|s| &s.id == id));
            for sub in subs.iter() {
                let slot = slots
                    .entry(sub.id.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.settings.endpoint_concurrency)))
                    .clone();
                let free = slot.available_permits().min(global.available_permits());
                if free == 0 {
                    continue;
                }
                let now = now_ms();
                let claimed = match self.queue.claim(&sub.id, now, now + lease_ms, free).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "Claim failed.");
                        break;
                    }
                };
                for member in claimed {
                    let permits = (
                        slot.clone().try_acquire_owned().expect("free permit"),
                        global.clone().try_acquire_owned().expect("free permit"),
                    );
                    let (me, sub, room) = (self.clone(), sub.clone(), room.clone());
                    tokio::spawn(async move { me.run_job(sub, member, permits, &room).await });
                }
            }
            self.report_pending(&subs).await;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // Let attempts in flight finish (bounded); unfinished ones are
        // claimed again after their lease.
        let _ = tokio::time::timeout(
            self.settings.timeout + Duration::from_secs(1),
            global.acquire_many(self.settings.max_in_flight as u32),
        )
        .await;
    }

    async fn report_pending(&self, subs: &[Subscription]) {
        let mut total = 0;
        for s in subs {
            total += self.queue.pending(&s.id).await.unwrap_or(0);
        }
        self.metrics.set_pending(total as i64);
    }

    async fn run_job(
        &self,
        sub: Subscription,
        member: String,
        _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
        room: &Semaphore,
    ) {
        if let Err(e) = self.try_job(&sub, &member, room).await {
            // The job keeps its lease and is attempted again after it.
            warn!(subscription = %sub.id, error = %e, "Delivery bookkeeping failed; will retry.");
        }
    }

    async fn try_job(
        &self,
        sub: &Subscription,
        member: &str,
        room: &Semaphore,
    ) -> anyhow::Result<()> {
        // Room for the body among those in flight before it is read (a body
        // larger than all the room takes all of it, alone); without room the
        // job goes back to its queue unattempted.
        let len = self.queue.body_len(member).await?;
        let want = len.min(self.settings.max_in_flight_bytes);
        let Ok(_room) = room.try_acquire_many(u32::try_from(want).unwrap_or(u32::MAX)) else {
            debug!(subscription = %sub.id, bytes = len, "No room for the body yet; the job waits.");
            self.metrics.waited_for_room();
            self.queue
                .postpone(&sub.id, member, now_ms() + NO_ROOM_DELAY_MS)
                .await?;
            return Ok(());
        };
        let Some((event, attempts_before)) = self.queue.load(&sub.id, member).await? else {
            let event = QueuedEvent {
                event_id: member
                    .split_once('/')
                    .map_or(member, |(_, id)| id)
                    .to_owned(),
                event_type: String::new(),
                body: Vec::new(),
                traceparent: String::new(),
            };
            self.give_up(
                sub,
                member,
                &event,
                0,
                "expired",
                "event body expired before delivery",
                "dead",
            )
            .await?;
            return Ok(());
        };
        let attempt = attempts_before + 1;
        if let Some((_, reason)) = &sub.disabled {
            let detail = format!("subscription disabled: {reason}");
            self.give_up(
                sub,
                member,
                &event,
                attempts_before,
                "subscription_disabled",
                &detail,
                "disabled",
            )
            .await?;
            return Ok(());
        }
        let started = Instant::now();
        let (verdict, status, error) = self.send(sub, &event).await;
        let latency = started.elapsed();
        let now = now_ms();
        let mut log = AttemptLog {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            attempt,
            outcome: String::new(),
            status_code: status,
            error: error.map(str::to_owned),
            latency_ms: latency.as_millis() as u64,
            at: rfc3339(now),
            next_retry_at: None,
        };
        let outcome: &'static str = match verdict {
            Verdict::Delivered => {
                self.queue
                    .finish(&sub.id, member, attempt, "delivered")
                    .await?;
                if sub.failing_since_ms.is_some() {
                    self.subs.succeeded(&sub.id).await?;
                }
                "delivered"
            }
            Verdict::Gone => {
                info!(subscription = %sub.id, "Subscription disabled: receiver answered 410.");
                let why = "receiver answered 410 Gone";
                self.disable(sub, member, &event, attempt, "gone", why)
                    .await?;
                "disabled"
            }
            Verdict::Failed(reason) => {
                self.subs.failed(&sub.id, now).await?;
                let detail = describe(status, error);
                self.give_up(sub, member, &event, attempt, reason, &detail, "failed")
                    .await?;
                "failed"
            }
            Verdict::Retry { retry_after } => {
                let since = self.subs.failed(&sub.id, now).await?;
                let failing_for = Duration::from_millis((now - since).max(0) as u64);
                let delay = policy::next_delay(
                    &self.settings.schedule_secs,
                    attempt,
                    retry_after,
                    rand::thread_rng().gen(),
                );
                if failing_for >= self.settings.disable_after {
                    let why = format!("failing for {}s without a success", failing_for.as_secs());
                    warn!(subscription = %sub.id, failing_secs = failing_for.as_secs(), "Subscription disabled automatically: endpoint keeps failing.");
                    self.disable(sub, member, &event, attempt, "failing", &why)
                        .await?;
                    "disabled"
                } else if let Some(delay) = delay {
                    let due = now + delay.as_millis() as i64;
                    self.queue.retry_at(&sub.id, member, attempt, due).await?;
                    log.next_retry_at = Some(rfc3339(due));
                    "retrying"
                } else {
                    let detail = format!(
                        "retry schedule exhausted; last: {}",
                        describe(status, error)
                    );
                    self.give_up(
                        sub,
                        member,
                        &event,
                        attempt,
                        "max_attempts",
                        &detail,
                        "dead",
                    )
                    .await?;
                    "dead"
                }
            }
        };
        log.outcome = outcome.into();
        self.metrics.attempt(outcome, latency.as_secs_f64());
        debug!(subscription = %sub.id, event_id = %event.event_id, attempt, outcome, status = ?status, error, "Delivery attempt.");
        self.queue.log(&sub.id, &log).await?;
        Ok(())
    }

    /// One POST; returns the verdict, the status and an error class.
    async fn send(
        &self,
        sub: &Subscription,
        event: &QueuedEvent,
    ) -> (Verdict, Option<u16>, Option<&'static str>) {
        // IP literals bypass the resolver: check them here too.
        if guard::check_url(&sub.callback_url, self.settings.policy).is_err() {
            return (
                Verdict::Failed("blocked_address"),
                None,
                Some("blocked_address"),
            );
        }
        let now = now_ms();
        let mut req = self
            .client
            .post(&sub.callback_url)
            .timeout(self.settings.timeout)
            .header("content-type", "application/json")
            .header("x-webhook-event-type", &event.event_type)
            .body(event.body.clone());
        // Continue the event's trace: a child span when traces are
        // exported, else the raw record's context as it came.
        let span = tracing::info_span!("hooklog.deliver", subscription = %sub.id);
        hooklog_schemas::telemetry::set_parent(&span, |k| {
            (k == "traceparent" && !event.traceparent.is_empty())
                .then_some(event.traceparent.as_str())
        });
        let traceparent = hooklog_schemas::telemetry::context_of(&span)
            .map(|t| t.header_value())
            .unwrap_or_else(|| event.traceparent.clone());
        if !traceparent.is_empty() {
            req = req.header("traceparent", traceparent);
        }
        for (name, value) in sign::headers(
            &sub.signing_secrets(now),
            &event.event_id,
            now / 1000,
            &event.body,
        ) {
            req = req.header(name, value);
        }
        match req.send().instrument(span).await {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                // Read a little of the body so the connection can be reused;
                // it is never logged or stored.
                let mut read = 0;
                while read < MAX_RESPONSE_BYTES {
                    match resp.chunk().await {
                        Ok(Some(c)) => read += c.len(),
                        _ => break,
                    }
                }
                (
                    policy::classify(status, retry_after.as_deref()),
                    Some(status),
                    None,
                )
            }
            Err(e) => {
                let class = if e.is_timeout() {
                    "timeout"
                } else if is_blocked(&e) {
                    return (
                        Verdict::Failed("blocked_address"),
                        None,
                        Some("blocked_address"),
                    );
                } else if e.is_connect() {
                    "connect"
                } else {
                    "request"
                };
                (Verdict::Retry { retry_after: None }, None, Some(class))
            }
        }
    }

    /// Disables the subscription (`label` = gone | failing), dead-letters
    /// this event and refreshes the copy so no further attempt is made.
    async fn disable(
        &self,
        sub: &Subscription,
        member: &str,
        event: &QueuedEvent,
        attempt: u32,
        label: &'static str,
        why: &str,
    ) -> anyhow::Result<()> {
        self.subs.disable(&sub.id, now_ms(), why).await?;
        self.metrics.disabled(label);
        self.give_up(
            sub,
            member,
            event,
            attempt,
            "subscription_disabled",
            why,
            "disabled",
        )
        .await?;
        self.cache.refresh(&self.subs).await?;
        Ok(())
    }

    /// Dead-letters the event for this subscription, then ends the job in
    /// `state`. A crash between the two only dead-letters it twice.
    #[allow(clippy::too_many_arguments)]
    async fn give_up(
        &self,
        sub: &Subscription,
        member: &str,
        event: &QueuedEvent,
        attempts: u32,
        reason: &'static str,
        detail: &str,
        state: &str,
    ) -> anyhow::Result<()> {
        let (event_id, event_type, body) = (&event.event_id, &event.event_type, &event.body);
        let count = attempts.to_string();
        self.publisher
            .record(
                topics::DELIVERY_DLQ,
                event_id.as_bytes(),
                body,
                &[
                    (headers::DLQ_REASON, reason),
                    (headers::DLQ_DETAIL, detail),
                    (headers::DLQ_SUBSCRIPTION, &sub.id),
                    (headers::DLQ_ATTEMPTS, &count),
                    (headers::EVENT_TYPE, event_type),
                ],
            )
            .await?;
        self.metrics.dead_lettered(reason);
        warn!(subscription = %sub.id, event_id = %event_id, reason, detail, "Delivery dead-lettered.");
        self.queue.finish(&sub.id, member, attempts, state).await?;
        Ok(())
    }
}

/// True when the guarded resolver refused the host.
fn is_blocked(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains("resolves to no public address") {
            return true;
        }
        source = s.source();
    }
    false
}

fn describe(status: Option<u16>, error: Option<&str>) -> String {
    match (status, error) {
        (Some(s), _) => format!("HTTP {s}"),
        (None, Some(e)) => e.to_owned(),
        (None, None) => "unknown".into(),
    }
}
