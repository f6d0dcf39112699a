//! Publishes entity states to `hooklog.state.<projection>` (compacted, keyed
//! by entity key) and dead letters to `hooklog.dlq`, with one idempotent
//! `acks=all` producer and every record of a batch in flight at once.

use std::time::Duration;

use futures::future::try_join_all;
use hooklog_schemas::kafka::{KafkaConfig, ResettableProducer};
use hooklog_schemas::{headers, topics};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};

use crate::batch::Record;
use crate::projection::store::EntityState;

/// The processor's producer.
#[derive(Clone)]
pub struct Publisher {
    producer: ResettableProducer,
}

impl Publisher {
    /// Creates the producer.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut cfg = kafka.base();
        // Changelog and DLQ writes gate offset commits: they must be durable.
        cfg.set("enable.idempotence", "true");
        cfg.set("acks", "all");
        cfg.set("compression.type", "lz4");
        // Batch the many records of one apply batch.
        cfg.set("linger.ms", "2");
        cfg.set("message.timeout.ms", "10000");
        Ok(Self {
            producer: ResettableProducer::new(kafka.finish(cfg), Duration::from_secs(5))?,
        })
    }

    /// Publishes states; returns once every record is acknowledged.
    pub async fn states(
        &self,
        states: &[(EntityState, Option<Vec<u8>>)],
    ) -> Result<(), KafkaError> {
        let sends = states.iter().map(|(s, traceparent)| {
            let topic = topics::state_topic(&s.projection);
            let version = s.version.to_string();
            let mut h = OwnedHeaders::new().insert(Header {
                key: headers::PROJECTION_VERSION,
                value: Some(&version),
            });
            if let Some(tp) = traceparent {
                h = h.insert(Header {
                    key: headers::TRACEPARENT,
                    value: Some(tp),
                });
            }
            let record = FutureRecord::to(&topic)
                .key(&s.key)
                .payload(&s.json)
                .headers(h);
            self.enqueue(record)
        });
        self.settle(try_join_all(sends).await)
    }

    /// On failure the batch is retried whole: replace the producer so the
    /// old one never retries the records on its own.
    fn settle<T>(&self, result: Result<T, KafkaError>) -> Result<(), KafkaError> {
        result.map(|_| ()).inspect_err(|_| self.producer.reset())
    }

    /// Dead-letters records: original key, value and headers, plus reason.
    pub async fn dead_letters(&self, records: &[(&Record, &str)]) -> Result<(), KafkaError> {
        let sends = records.iter().map(|(r, reason)| {
            let mut h = OwnedHeaders::new();
            for (k, v) in &r.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let position = format!("{}/{}", r.partition, r.offset);
            h = h
                .insert(Header {
                    key: headers::DLQ_REASON,
                    value: Some(*reason),
                })
                .insert(Header {
                    key: headers::DLQ_TOPIC,
                    value: Some(&r.topic),
                })
                .insert(Header {
                    key: headers::DLQ_POSITION,
                    value: Some(&position),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topics::DLQ).headers(h);
            if let Some(k) = &r.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &r.payload {
                record = record.payload(p.as_slice());
            }
            self.enqueue(record)
        });
        self.settle(try_join_all(sends).await)
    }

    /// Publishes one record with `headers`; returns once it is acknowledged.
    pub async fn record(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(h);
        let sent = self.enqueue(record).await;
        self.settle(sent)
    }

    /// Queues a record; the returned future resolves with its ack.
    fn enqueue<K: rdkafka::message::ToBytes + ?Sized, P: rdkafka::message::ToBytes + ?Sized>(
        &self,
        record: FutureRecord<'_, K, P>,
    ) -> impl std::future::Future<Output = Result<(), KafkaError>> {
        let queued = self
            .producer
            .current()
            .send_result(record)
            .map_err(|(e, _)| e);
        async move {
            match queued?.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            }
        }
    }

    /// Flushes outstanding records.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.current().flush(timeout)
    }
}
