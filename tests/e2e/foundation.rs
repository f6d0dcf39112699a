//! The harness itself: a real broker round trip through a consumer group,
//! and a Redis round trip.

use std::time::Duration;

use hooklog_e2e::{kafka, shared_stack, unique};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::ClientConfig;
use rdkafka::Message;

#[tokio::test]
async fn kafka_round_trip_through_a_consumer_group() {
    let stack = shared_stack();
    let env = hooklog_e2e::TestEnv::new("foundation");
    env.create_topics();
    let topic = env.topic("fulfillment");
    let producer = kafka::producer(&stack.brokers);
    let records: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("k{i}"), format!("v{i}").into_bytes()))
        .collect();
    kafka::produce_all(&producer, &topic, &records).await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", unique("e2e-group-"))
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of 50 consumed",
            seen.len()
        );
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let value = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
            assert_eq!(value, key.replace('k', "v"));
            seen.insert(key);
        }
    }
    assert_eq!(seen.len(), 50);
    assert_eq!(kafka::record_count(&stack.brokers, &topic), 50);
}

#[test]
fn redis_round_trip() {
    let mut conn = shared_stack().redis();
    let key = unique("e2e:roundtrip:");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello")
        .query(&mut conn)
        .unwrap();
    let got: String = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert_eq!(got, "hello");
    let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).unwrap();
}
