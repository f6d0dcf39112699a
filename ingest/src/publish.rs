//! The Kafka producer: idempotent, `acks=all`, compressed, with a bounded
//! delivery timeout, and many records in flight (each HTTP request awaits
//! only its own delivery report).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hooklog_schemas::kafka::{KafkaConfig, ResettableProducer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::ClientConfig;

/// Where a record landed.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Why a record was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// librdkafka's local queue is full (back-pressure).
    #[error("producer queue full")]
    QueueFull,
    /// The broker did not acknowledge before the delivery timeout, or failed.
    #[error("kafka delivery failed: {0}")]
    Kafka(#[from] KafkaError),
    /// The delivery report channel closed (producer shutting down).
    #[error("delivery report lost")]
    Canceled,
    /// No delivery report within `publish_timeout_ms`. The record may still
    /// land later; the provider's retry then stores a duplicate that the
    /// processor drops by event id.
    #[error("no broker ack within the publish timeout")]
    Timeout,
}

/// The producer plus a reachability flag for `/readyz`.
#[derive(Clone)]
pub struct Publisher {
    producer: ResettableProducer,
    reachable: Arc<AtomicBool>,
    timeout: Duration,
}

/// librdkafka settings of the ingest producer.
pub fn producer_config(kafka: &KafkaConfig, publish_timeout_ms: u64) -> ClientConfig {
    let mut cfg = kafka.base();
    // Never duplicate or reorder on internal retries; implies acks=all.
    cfg.set("enable.idempotence", "true");
    // The ack means every in-sync replica has the record.
    cfg.set("acks", "all");
    // The HTTP answer waits for this: bound it below the providers' deadline.
    cfg.set("message.timeout.ms", publish_timeout_ms.to_string());
    cfg.set(
        "request.timeout.ms",
        publish_timeout_ms.min(30_000).to_string(),
    );
    // Each answer waits for its ack, so linger is a latency floor; batching
    // still happens naturally while requests are in flight.
    cfg.set("linger.ms", "0");
    cfg.set("compression.type", "lz4");
    // Room for many concurrent requests.
    cfg.set("queue.buffering.max.messages", "200000");
    kafka.finish(cfg)
}

impl Publisher {
    /// Creates the producer (does not connect yet).
    pub fn new(kafka: &KafkaConfig, publish_timeout_ms: u64) -> Result<Self, KafkaError> {
        // librdkafka's message.timeout.ms does not bound a record that is
        // in flight when the connection drops (seen: 10 s for a 3 s
        // setting), so the answer is bounded here as well.
        let timeout = Duration::from_millis(publish_timeout_ms);
        let producer =
            ResettableProducer::new(producer_config(kafka, publish_timeout_ms), timeout)?;
        Ok(Self {
            producer,
            reachable: Arc::new(AtomicBool::new(false)),
            timeout,
        })
    }

    /// Publishes one record and waits for its delivery report.
    pub async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<Ack, PublishError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .headers(owned);
        let delivery = match self.producer.current().send_result(record) {
            Ok(f) => f,
            Err((
                KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                _,
            )) => return Err(PublishError::QueueFull),
            Err((e, _)) => return Err(e.into()),
        };
        let Ok(report) = tokio::time::timeout(self.timeout, delivery).await else {
            self.producer.reset();
            return Err(PublishError::Timeout);
        };
        match report {
            Ok(Ok(d)) => {
                self.reachable.store(true, Ordering::Relaxed);
                Ok(Ack {
                    partition: d.partition,
                    offset: d.offset,
                })
            }
            Ok(Err((e, _))) => {
                if matches!(
                    e,
                    KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::MessageTimedOut
                    )
                ) {
                    self.producer.reset();
                }
                Err(e.into())
            }
            Err(_) => Err(PublishError::Canceled),
        }
    }

    /// Whether the last metadata probe reached the cluster.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Probes the cluster with a metadata request (blocking; call from a
    /// blocking thread) and records the result.
    pub fn probe(&self, timeout: Duration) -> bool {
        let ok = self
            .producer
            .current()
            .client()
            .fetch_metadata(None, timeout)
            .is_ok_and(|m| !m.brokers().is_empty());
        self.reachable.store(ok, Ordering::Relaxed);
        ok
    }

    /// Waits until every queued record is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.current().flush(timeout)
    }
}
