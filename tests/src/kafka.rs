//! Reading and writing records in tests.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A record as read back.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The key as text.
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
}

fn consumer(brokers: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("e2e-reader-"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("consumer")
}

/// Whether the broker answers a metadata request.
pub fn reachable(brokers: &str) -> bool {
    let c: Result<BaseConsumer, _> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create();
    c.is_ok_and(|c| {
        c.fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|m| !m.brokers().is_empty())
    })
}

/// Partition count of a topic (0 when unknown).
pub fn partitions(brokers: &str, topic: &str) -> i32 {
    let c = consumer(brokers);
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    md.topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0)
}

/// High watermark summed over partitions: records ever written.
pub fn record_count(brokers: &str, topic: &str) -> i64 {
    let c = consumer(brokers);
    (0..partitions(brokers, topic))
        .map(|p| {
            let (lo, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .expect("watermarks");
            hi - lo
        })
        .sum()
}

/// Reads every record of `topic` up to the current high watermarks.
pub fn read_all(brokers: &str, topic: &str) -> Vec<Rec> {
    let c = consumer(brokers);
    let mut tpl = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    for p in 0..partitions(brokers, topic) {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .expect("watermarks");
        if hi > lo {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
            remaining.insert(p, hi);
        }
    }
    let mut out = Vec::new();
    if remaining.is_empty() {
        return out;
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !remaining.is_empty() {
        assert!(Instant::now() < deadline, "reading {topic} timed out");
        if let Some(m) = poll_record(&c) {
            out.push(to_rec(&m));
            if remaining
                .get(&m.partition())
                .is_some_and(|hi| m.offset() + 1 >= *hi)
            {
                remaining.remove(&m.partition());
            }
        }
    }
    out
}

/// Reads the record at one position.
pub fn read_at(brokers: &str, topic: &str, partition: i32, offset: i64) -> Rec {
    let c = consumer(brokers);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .expect("tpl");
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "no record at {topic}/{partition}/{offset}"
        );
        if let Some(m) = poll_record(&c) {
            if m.offset() == offset {
                return to_rec(&m);
            }
        }
    }
}

/// One poll. A lost broker connection (`AllBrokersDown`, transport
/// failures: Tansu under the parallel suite's load) is reported as an error
/// while librdkafka reconnects; the callers' deadlines still bound the wait.
fn poll_record(c: &BaseConsumer) -> Option<rdkafka::message::BorrowedMessage<'_>> {
    match c.poll(Duration::from_millis(200))? {
        Ok(m) => Some(m),
        Err(KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure,
        )) => None,
        Err(e) => panic!("record: {e}"),
    }
}

fn to_rec<M: Message>(m: &M) -> Rec {
    Rec {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// An idempotent acks=all producer for tests.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces many records with all of them in flight (as many as the local
/// queue holds: when it is full, waits for the oldest ack); panics on any
/// failure.
pub async fn produce_all(producer: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    let mut pending = std::collections::VecDeque::new();
    for (k, v) in records {
        loop {
            match producer.send_result(FutureRecord::to(topic).key(k).payload(v)) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    let oldest = pending
                        .pop_front()
                        .expect("queue full with nothing in flight");
                    oldest
                        .await
                        .expect("delivery")
                        .map_err(|(e, _)| e)
                        .expect("ack");
                }
                Err((e, _)) => panic!("queue: {e}"),
            }
        }
    }
    for f in pending {
        f.await.expect("delivery").map_err(|(e, _)| e).expect("ack");
    }
}
