//! The fan-out: reads the raw topics in the deliverers' own consumer group
//! and turns every event that matches a subscription into a durable job in
//! Redis, then stores the batch's offsets. A crash before the offsets are
//! committed re-reads the batch; jobs that already exist are not created
//! again, so nothing is lost and nothing doubles.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hooklog_schemas::WebhookEvent;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::DeliveryMetrics;
use super::queue::{NewJob, Queue};
use super::subscription::{Subscription, SubscriptionCache, SubscriptionStore};
use crate::batch::{BatchLimit, DEFAULT_MAX_BYTES};
use crate::consume::{self, Health};

/// The fan-out loop's parts.
pub struct Fanout {
    /// Subscriptions.
    pub subs: SubscriptionStore,
    /// Shared copy of the subscriptions.
    pub cache: Arc<SubscriptionCache>,
    /// Jobs.
    pub queue: Queue,
    /// Metrics.
    pub metrics: Arc<DeliveryMetrics>,
    /// Health flags.
    pub health: Arc<Health>,
    /// Wakes the dispatcher after new jobs.
    pub wake: Arc<Notify>,
}

/// An event and the W3C `traceparent` of its raw record.
pub type Traced = (WebhookEvent, Option<String>);

/// The jobs a batch of events asks for: each event goes to every enabled
/// subscription whose source and pattern match and that existed when it
/// arrived.
pub fn jobs<'a>(subs: &'a [Subscription], events: &'a [Traced]) -> Vec<NewJob<'a>> {
    let mut out = Vec::new();
    for (e, traceparent) in events {
        for s in subs {
            if s.disabled.is_none()
                && s.matches(&e.source, &e.event_type)
                && e.received_at_ms >= s.created_at_ms
            {
                out.push(NewJob {
                    subscription: &s.id,
                    member: format!("{}/{}", e.source, e.event_id),
                    event_id: &e.event_id,
                    event_type: &e.event_type,
                    body: &e.body,
                    traceparent: traceparent.as_deref(),
                });
            }
        }
    }
    out
}

/// When a fan-out batch is full: every subscription's jobs for it are
/// enqueued in one go.
const BATCH: BatchLimit = BatchLimit {
    records: 500,
    bytes: DEFAULT_MAX_BYTES,
};

impl Fanout {
    /// Runs until `shutdown`.
    pub async fn run(&self, consumer: Arc<consume::GroupConsumer>, shutdown: CancellationToken) {
        self.health.running.store(true, Ordering::Relaxed);
        info!("Delivery fan-out consuming.");
        while let Some(batch) =
            consume::next_batch(&consumer, BATCH, Duration::from_millis(20), &shutdown).await
        {
            self.metrics.consumed(batch.len() as u64);
            // Undecodable records are the processor's to dead-letter.
            let events: Vec<Traced> = batch
                .iter()
                .filter_map(|r| {
                    let event = WebhookEvent::decode(r.payload.as_deref()?).ok()?;
                    let tp = r
                        .header(hooklog_schemas::headers::TRACEPARENT)
                        .and_then(|v| String::from_utf8(v.to_vec()).ok());
                    Some((event, tp))
                })
                .collect();
            let newest = events
                .iter()
                .map(|(e, _)| e.received_at_ms)
                .max()
                .unwrap_or(0);
            let mut backoff = Duration::from_millis(100);
            let mut paused = None;
            loop {
                match self.enqueue(&events, newest).await {
                    Ok(n) => {
                        self.metrics.enqueued(n);
                        if n > 0 {
                            self.wake.notify_one();
                        }
                        break;
                    }
                    Err(e) => {
                        paused.get_or_insert_with(|| self.health.pause());
                        self.metrics.set_paused(true);
                        warn!(error = %e, "Redis unavailable; fan-out paused, retrying.");
                        tokio::select! {
                            _ = shutdown.cancelled() => {
                                consume::commit_and_leave(consumer).await;
                                return;
                            }
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if let Some(paused) = paused {
                drop(paused);
                self.metrics.set_paused(false);
                info!("Redis back; fan-out resumed.");
            }
            consume::store_offsets(&consumer, &batch);
        }
        consume::commit_and_leave(consumer).await;
    }

    async fn enqueue(&self, events: &[Traced], newest_ms: i64) -> anyhow::Result<u64> {
        // A subscription created before an event arrived must be in the
        // copy used to match it.
        if self.cache.loaded_at_ms() <= newest_ms {
            self.cache.refresh(&self.subs).await?;
        }
        let subs = self.cache.snapshot();
        let jobs = jobs(&subs, events);
        let now = chrono::Utc::now().timestamp_millis();
        Ok(self.queue.enqueue(&jobs, now).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn sub(id: &str, pattern: &str, created: i64, disabled: bool) -> Subscription {
        Subscription {
            id: id.into(),
            event_type: pattern.into(),
            source: None,
            callback_url: "https://example.com".into(),
            description: None,
            created_at_ms: created,
            secret: SecretString::from("whsec_x".to_string()),
            previous_secret: None,
            disabled: disabled.then(|| (1, "gone".into())),
            failing_since_ms: None,
        }
    }

    fn event(id: &str, ty: &str, at: i64) -> WebhookEvent {
        crate::test_support::event(id, ty, "{}", at)
    }

    #[test]
    fn matches_type_creation_time_and_enabled() {
        let of_source = |id: &str, source: &str| Subscription {
            source: Some(source.into()),
            ..sub(id, "order.shipped", 100, false)
        };
        let subs = [
            sub("a", "order.shipped", 100, false),
            sub("b", "order.*", 100, false),
            sub("c", "order.shipped", 300, false),
            sub("d", "order.shipped", 0, true),
            of_source("e", "fulfillment"),
            of_source("f", "stripe"),
        ];
        let events = [
            (event("e1", "order.shipped", 200), None),
            (event("e2", "customer.signed_up", 200), None),
        ];
        let got: Vec<(&str, String)> = jobs(&subs, &events)
            .into_iter()
            .map(|j| (j.subscription, j.member))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", "fulfillment/e1".to_string()),
                ("b", "fulfillment/e1".to_string()),
                ("e", "fulfillment/e1".to_string())
            ]
        );
    }
}
