//! Horizontal scale on one machine: 3 ingest and 3 processor replicas (one
//! consumer group) on one broker with 6-partition raw topics. N events
//! plus 10% redeliveries go through the ingest replicas while one processor
//! is killed -9 and replaced (rebalances) and one ingest replica gets SIGTERM.
//! Every acknowledged event must be applied exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hooklog_e2e::events;
use hooklog_e2e::sign::{self, now};
use hooklog_e2e::{
    eventually, free_port, get_json, kafka, let_killed_member_expire, secret, Stack, TestEnv,
};
use serde_json::Value;

/// Distinct events (the issue asks for at least 20,000); `SCALE_EVENTS`
/// overrides. This needs the header index the harness adds to Tansu's
/// sqlite file: without it a 20,000-event run stalled (docs/processor.md).
fn events_to_send() -> usize {
    std::env::var("SCALE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}
const CUSTOMERS: usize = 500;

// Ignored in the parallel run: `make test` runs it afterwards on its own
// (deploy/local/test.sh), as does `make test-scale`. Under the parallel e2e
// load Tansu's group coordinator was seen starving the replacement member.
#[tokio::test]
#[ignore = "heavy; run alone (make test runs it after the parallel suite)"]
async fn three_by_three_replicas_apply_every_acknowledged_event_once() {
    let stack = Stack::start();
    let env = TestEnv::on(
        "scale",
        &stack.brokers,
        &stack.redis_url,
        // A long publish timeout: under this load on 2 cores a 3 s timeout
        // expired, and the producer reset that follows raced Tansu 0.6.0's
        // sqlite idempotence check into a panic (lite.rs:503).
        "[server]\npublish_timeout_ms = 20000\n[processor]\npartitions = 6",
    );
    env.create_topics();
    assert_eq!(kafka::partitions(&env.brokers, &env.topic("stripe")), 6);
    let ingest_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut ingests: Vec<_> = ingest_ports.iter().map(|p| env.ingest_on(*p)).collect();
    let proc_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut processors: Vec<_> = proc_ports[..3]
        .iter()
        .map(|p| env.processor_on(*p))
        .collect();

    // N distinct events, then every 10th sent again (a provider retry).
    let n = events_to_send();
    let mut plan: Vec<usize> = (0..n).collect();
    plan.extend((0..n).step_by(10));
    let body = |i: usize| {
        let customer = format!("cus_{}_{}", env.id.replace('-', ""), i % CUSTOMERS);
        events::stripe_charge(
            &format!("evt_{}_{i}", env.id),
            &format!("ch_{}_{i}", env.id),
            &customer,
            100 + (i as i64 % 977),
            1_740_000_000 + i as i64,
        )
    };
    let down: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(usize::MAX));
    let sent = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    let acked: Vec<Option<usize>> = {
        let requests = plan.iter().enumerate().map(|(n, &i)| {
            let (client, body, ports, down, sent) = (
                client.clone(),
                body(i),
                ingest_ports.clone(),
                down.clone(),
                sent.clone(),
            );
            async move {
                let headers = sign::headers("stripe", secret("stripe"), body.as_bytes(), now(), "");
                // Round robin; a replica that is gone is skipped, as a load
                // balancer would after its readiness probe fails.
                for attempt in 0..6 {
                    let r = (n + attempt) % 3;
                    if down.load(Ordering::SeqCst) == r {
                        continue;
                    }
                    let mut req = client
                        .post(format!("http://127.0.0.1:{}/webhooks/stripe", ports[r]))
                        .body(body.clone());
                    for (k, v) in &headers {
                        req = req.header(k, v);
                    }
                    if let Ok(resp) = req.timeout(Duration::from_secs(30)).send().await {
                        if resp.status() == 200 {
                            sent.fetch_add(1, Ordering::SeqCst);
                            return Some(i);
                        }
                    }
                }
                None
            }
        });
        let stream = futures::stream::iter(requests)
            .buffer_unordered(24)
            .collect::<Vec<_>>();
        let kill_processor = async {
            while sent.load(Ordering::SeqCst) < plan.len() / 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            processors[0].kill();
            let_killed_member_expire().await;
            processors.push(env.processor_on(proc_ports[3]));
        };
        let stop_ingest = async {
            while sent.load(Ordering::SeqCst) < plan.len() * 2 / 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            down.store(2, Ordering::SeqCst);
            ingests[2].terminate();
        };
        let chaos = async {
            tokio::join!(kill_processor, stop_ingest);
        };
        let (acked, ()) = tokio::join!(stream, chaos);
        acked
    };
    let acked: Vec<usize> = acked.into_iter().flatten().collect();
    assert!(
        acked.len() > plan.len() * 9 / 10,
        "only {} of {} acknowledged",
        acked.len(),
        plan.len()
    );

    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    let mut distinct: Vec<usize> = acked.clone();
    distinct.sort_unstable();
    distinct.dedup();
    for i in &distinct {
        let e = expected
            .entry(format!("cus_{}_{}", env.id.replace('-', ""), i % CUSTOMERS))
            .or_default();
        e.0 += 100 + (*i as i64 % 977);
        e.1 += 1;
    }
    let reader = format!("http://127.0.0.1:{}", proc_ports[3]);
    for (customer, (sum, count)) in &expected {
        let s = eventually(customer, Duration::from_secs(180), || async {
            get_json(&format!("{reader}/v1/projections/customers/{customer}"))
                .await
                .filter(|s| s["state"]["charges"].as_i64() >= Some(*count))
        })
        .await;
        assert_eq!(
            s["state"]["charges"].as_i64(),
            Some(*count),
            "{customer}: applied twice?"
        );
        assert_eq!(
            s["state"]["total_charged"].as_i64(),
            Some(*sum),
            "{customer}: sum"
        );
    }

    // The changelog's last record per key is the final state. A state is
    // readable a moment before its changelog record is acknowledged, so
    // the last records may still be on their way when the reads above end.
    let is_final = |last: &HashMap<String, Value>| {
        expected.iter().all(|(customer, (sum, count))| {
            last.get(customer).is_some_and(|v| {
                v["state"]["total_charged"].as_i64() == Some(*sum)
                    && v["state"]["charges"].as_i64() == Some(*count)
            })
        })
    };
    let read_last = || {
        let mut last: HashMap<String, Value> = HashMap::new();
        for r in kafka::read_all(&env.brokers, "hooklog.state.customers") {
            if expected.contains_key(&r.key_str()) {
                last.insert(
                    r.key_str(),
                    serde_json::from_slice(r.value.as_deref().unwrap()).unwrap(),
                );
            }
        }
        last
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut last = read_last();
    while !is_final(&last) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = read_last();
    }
    for (customer, (sum, count)) in &expected {
        let v = &last[customer];
        assert_eq!(
            v["state"]["total_charged"].as_i64(),
            Some(*sum),
            "{customer}: changelog"
        );
        assert_eq!(
            v["state"]["charges"].as_i64(),
            Some(*count),
            "{customer}: changelog"
        );
    }
}
