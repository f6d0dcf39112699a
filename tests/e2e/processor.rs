//! hooklog-processor end to end: seed scenarios through ingest to the read
//! API, exactly-once applies under retries, kill -9 and Redis outages, DLQ,
//! and the changelog (including a crash between apply and changelog).

use std::collections::HashMap;
use std::time::Duration;

use hooklog_e2e::events::{self, raw};
use hooklog_e2e::sign::{self, now};
use hooklog_e2e::{
    eventually, get_json, kafka, let_killed_member_expire, metric, private_redis, private_replica,
    secret, shared_stack, wait_http_ok, Stack, TestEnv,
};
use serde_json::Value;

use crate::ingest::post;

/// Posts a signed `body` for `source` to ingest; asserts 200, returns the receipt.
pub async fn send(env: &TestEnv, source: &str, scheme: &str, body: &str, id: &str) -> Value {
    let headers = sign::headers(scheme, secret(source), body.as_bytes(), now(), id);
    let r = post(env, source, &headers, body.as_bytes().to_vec()).await;
    assert_eq!(r.status, 200, "{}", r.json);
    r.json
}

async fn state(env: &TestEnv, projection: &str, key: &str) -> Option<Value> {
    get_json(&format!(
        "{}/v1/projections/{projection}/{key}",
        env.processor_url()
    ))
    .await
}

/// Waits until the entity satisfies `ok`.
async fn wait_state(
    env: &TestEnv,
    projection: &str,
    key: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    eventually(
        &format!("{projection}/{key}"),
        Duration::from_secs(120),
        || async { state(env, projection, key).await.filter(|s| ok(s)) },
    )
    .await
}

#[tokio::test]
async fn seed_scenarios_from_webhook_to_read_api_and_changelog() {
    let env = TestEnv::new("proc-seed");
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    let customer = format!("cus_{}", env.id.replace('-', ""));

    let receipt = send(
        &env,
        "fulfillment",
        "hmac-sha256",
        events::SEED_ORDER_SHIPPED,
        "",
    )
    .await;
    let order_event_id = receipt["event_id"].as_str().unwrap().to_owned();
    assert!(
        order_event_id.starts_with("sha256:"),
        "the seed order.shipped has no id: body hash"
    );
    send(
        &env,
        "accounts",
        "hmac-sha256",
        &events::customer_signed_up(&format!("evt_su_{customer}"), &customer, "ada@example.com"),
        "",
    )
    .await;
    send(
        &env,
        "stripe",
        "stripe",
        &events::seed_stripe_charge(&customer),
        "",
    )
    .await;

    let order = wait_state(&env, "orders", "ORD-633261", |s| {
        s["state"]["status"] == "shipped"
    })
    .await;
    assert_eq!(order["state"]["shipping_carrier"], "FedEx");
    assert_eq!(order["state"]["tracking_number"], "1ZBPWJXU5C9BPQBMCI");
    assert_eq!(order["state"]["shipped_at"], "2025-03-01T12:00:00Z");
    assert_eq!(order["last_event_id"], order_event_id.as_str());
    assert_eq!(order["updated_at"], "2025-03-01T12:00:00.000Z");
    assert_eq!(order["version"], 1);

    // Conditional reads: 304 until the entity changes, then a new ETag.
    let url = format!("{}/v1/projections/orders/ORD-633261", env.processor_url());
    let client = reqwest::Client::new();
    let etag = client.get(&url).send().await.unwrap().headers()["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    let again = client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"].to_str().unwrap(), etag);
    assert!(again.bytes().await.unwrap().is_empty());
    let delivered = r#"{"event_type":"order.delivered","order_id":"ORD-633261","delivered_at":"2025-03-02T09:30:00Z"}"#;
    send(&env, "fulfillment", "hmac-sha256", delivered, "").await;
    wait_state(&env, "orders", "ORD-633261", |s| {
        s["state"]["status"] == "delivered"
    })
    .await;
    let changed = client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    assert_ne!(changed.headers()["etag"].to_str().unwrap(), etag);
    let changed: Value = changed.json().await.unwrap();
    assert_eq!(changed["state"]["delivered_at"], "2025-03-02T09:30:00Z");

    let charge = wait_state(&env, "charges", "ch_1H6XgJ2eZvKYlo2C0Lq5sJgQ", |_| true).await;
    assert_eq!(charge["state"]["amount"], 2000);
    assert_eq!(charge["state"]["currency"], "usd");
    assert_eq!(charge["state"]["status"], "succeeded");
    assert_eq!(charge["last_event_id"], "evt_1H6XgJ2eZvKYlo2CnQ7v2xY7");

    let cust = wait_state(&env, "customers", &customer, |s| {
        s["state"]["charges"] == 1 && s["state"]["email"].is_string()
    })
    .await;
    assert_eq!(cust["state"]["email"], "ada@example.com");
    assert_eq!(cust["state"]["total_charged"], 2000);

    // Unknown projection or key: 404 with a JSON error.
    let resp = reqwest::get(format!(
        "{}/v1/projections/orders/ORD-none",
        env.processor_url()
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "unknown_key");
    let resp = reqwest::get(format!("{}/v1/projections/nope/x", env.processor_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let list = get_json(&format!("{}/v1/projections", env.processor_url()))
        .await
        .unwrap();
    assert_eq!(list["projections"].as_array().unwrap().len(), 3);

    // The changelog carries the latest state per entity key.
    let latest = eventually(
        "changelog for the customer",
        Duration::from_secs(30),
        || async {
            kafka::read_all(&env.brokers, "hooklog.state.customers")
                .into_iter()
                .filter(|r| r.key_str() == customer)
                .map(|r| serde_json::from_slice::<Value>(r.value.as_deref().unwrap()).unwrap())
                .rfind(|v| v["state"]["charges"] == 1 && v["state"]["email"].is_string())
        },
    )
    .await;
    assert_eq!(latest["state"], cust["state"]);
}

#[tokio::test]
async fn a_provider_retrying_five_times_is_applied_once() {
    let env = TestEnv::new("proc-dup");
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    let customer = format!("cus_dup{}", env.id.replace('-', ""));
    let body = events::stripe_charge("evt_dup_1", "ch_dup_1", &customer, 1250, 1_740_830_400);
    for _ in 0..5 {
        send(&env, "stripe", "stripe", &body, "").await;
    }
    assert_eq!(
        kafka::record_count(&env.brokers, &env.topic("stripe")),
        5,
        "every delivery is stored"
    );
    let url = env.processor_url();
    eventually("4 duplicates counted", Duration::from_secs(60), || async {
        (metric(
            &url,
            "hooklog_processor_duplicate_events_total",
            &["customers"],
        )
        .await
            == 4.0)
            .then_some(())
    })
    .await;
    assert_eq!(
        metric(
            &url,
            "hooklog_processor_applied_events_total",
            &["customers"]
        )
        .await,
        1.0
    );
    let cust = state(&env, "customers", &customer).await.unwrap();
    assert_eq!(cust["state"]["total_charged"], 1250);
    assert_eq!(cust["state"]["charges"], 1);
}

/// Records to produce (key, value).
type Records = Vec<(String, Vec<u8>)>;
/// Expected (sum, count) per customer.
type Expected = HashMap<String, (i64, i64)>;

/// A namespace on `brokers` and `redis_url` with small batches (several
/// per run, so an outage lands between them), its topics, and a stream of
/// `n` Stripe charges over `customers` customers with their expected sums.
fn charge_env(
    name: &str,
    brokers: &str,
    redis_url: &str,
    n: usize,
    customers: usize,
) -> (TestEnv, Records, Expected) {
    let env = TestEnv::on(name, brokers, redis_url, "[processor]\nbatch_size = 100");
    env.create_topics();
    let (records, expected) = charge_stream(&env, n, customers);
    (env, records, expected)
}

/// Charges for `customers` customers, `n` events; returns expected sums.
pub fn charge_stream(env: &TestEnv, n: usize, customers: usize) -> (Records, Expected) {
    let mut records = Vec::with_capacity(n);
    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    for i in 0..n {
        let customer = format!("cus_{}_{}", env.id.replace('-', ""), i % customers);
        let amount = 100 + (i as i64 * 7919) % 10_000;
        let id = format!("evt_{}_{i}", env.id);
        let body = events::stripe_charge(
            &id,
            &format!("ch_{}_{i}", env.id),
            &customer,
            amount,
            1_740_830_400 + i as i64,
        );
        let e = expected.entry(customer).or_default();
        e.0 += amount;
        e.1 += 1;
        records.push((
            id.clone(),
            raw("stripe", "stripe", &id, "charge.succeeded", &body).encode(),
        ));
    }
    (records, expected)
}

/// Writes `records` to the namespace's Stripe topic, every one acknowledged.
async fn produce_stripe(env: &TestEnv, records: &[(String, Vec<u8>)]) {
    kafka::produce_all(
        &kafka::producer(&env.brokers),
        &env.topic("stripe"),
        records,
    )
    .await;
}

async fn assert_sums(env: &TestEnv, expected: &HashMap<String, (i64, i64)>) {
    for (customer, (sum, count)) in expected {
        let s = wait_state(env, "customers", customer, |s| {
            s["state"]["charges"].as_i64() >= Some(*count)
        })
        .await;
        assert_eq!(
            s["state"]["charges"].as_i64(),
            Some(*count),
            "{customer}: count"
        );
        assert_eq!(
            s["state"]["total_charged"].as_i64(),
            Some(*sum),
            "{customer}: sum"
        );
    }
}

async fn applied(env: &TestEnv) -> f64 {
    metric(
        &env.processor_url(),
        "hooklog_processor_applied_events_total",
        &["customers"],
    )
    .await
}

/// Waits until at least `n` events count as applied to customers; returns
/// how many do.
async fn wait_applied(env: &TestEnv, n: f64) -> f64 {
    eventually(
        &format!("{n} events applied"),
        Duration::from_secs(120),
        || async {
            let a = applied(env).await;
            (a >= n).then_some(a)
        },
    )
    .await
}

/// Asserts that the processor retried through a failure of `dependency`.
async fn assert_retried(env: &TestEnv, dependency: &str) {
    let retries = metric(
        &env.processor_url(),
        "hooklog_processor_transient_retries_total",
        &[dependency],
    )
    .await;
    assert!(retries >= 1.0, "{dependency} retries: {retries}");
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let stack = Stack::start();
    let env = TestEnv::on("proc-kill", &stack.brokers, &stack.redis_url, "");
    env.create_topics();
    let (records, expected) = charge_stream(&env, 10_000, 40);
    produce_stripe(&env, &records).await;
    let mut processor = env.processor();
    wait_applied(&env, 2000.0).await;
    processor.kill();
    let_killed_member_expire().await;
    let _processor = env.processor();
    assert_sums(&env, &expected).await;
}

/// A batch ends at `processor.batch_max_bytes` as well as at `batch_size`:
/// a backlog of large records is applied in small batches, so the
/// processor's memory stays bounded whatever the records' size.
#[tokio::test]
async fn a_backlog_of_large_records_is_applied_in_batches_bounded_by_bytes() {
    let s = shared_stack();
    // A long batch wait: without the byte limit the whole backlog would
    // make one batch.
    let env = TestEnv::on(
        "proc-bytes",
        &s.brokers,
        &s.redis_url,
        "[processor]\nbatch_size = 500\nbatch_wait_ms = 2000\nbatch_max_bytes = 65536",
    );
    env.create_topics();
    let customer = format!("cus_{}", env.id.replace('-', ""));
    let padding = "x".repeat(20_000);
    let records: Records = (0..40)
        .map(|i| {
            let id = format!("evt_{}_{i}", env.id);
            let charge = format!("ch_{}_{i}", env.id);
            let body = events::stripe_charge(&id, &charge, &customer, 100, 1_740_830_400 + i);
            // A large field no rule reads: ~20 KB per record.
            let body = format!("{{\"padding\":\"{padding}\",{}", &body[1..]);
            let event = raw("stripe", "stripe", &id, "charge.succeeded", &body);
            (id, event.encode())
        })
        .collect();
    produce_stripe(&env, &records).await;
    let _processor = env.processor();
    assert_sums(&env, &HashMap::from([(customer, (4_000, 40))])).await;
    // Four records of ~20 KB reach 64 KiB: at least ten batches. A batch
    // is counted once its changelog is acknowledged, after its state is
    // readable: wait for the count (one batch of 40 never gets there).
    eventually(
        "ten batches for 40 records of ~20 KB",
        Duration::from_secs(30),
        || async {
            let batches = metric(
                &env.processor_url(),
                "hooklog_processor_apply_batch_duration_seconds_count",
                &[],
            )
            .await;
            (batches >= 10.0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn redis_outage_pauses_and_resumes_without_loss() {
    let mut stack = Stack::start();
    let (env, records, expected) =
        charge_env("proc-redis", &stack.brokers, &stack.redis_url, 5000, 20);
    let mut processor = env.processor();
    let producer = kafka::producer(&env.brokers);
    kafka::produce_all(&producer, &env.topic("stripe"), &records[..2500]).await;
    wait_applied(&env, 500.0).await;

    stack.redis.as_mut().unwrap().terminate();
    kafka::produce_all(&producer, &env.topic("stripe"), &records[2500..]).await;
    let ready = format!("{}/readyz", env.processor_url());
    eventually(
        "readyz reports the pause",
        Duration::from_secs(30),
        || async { get_json(&ready).await.is_none().then_some(()) },
    )
    .await;
    assert_retried(&env, "redis").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.redis.as_mut().unwrap().start();
    stack.wait_ready();
    assert_sums(&env, &expected).await;
    // Committed offsets never passed an unapplied record: a restart from
    // them still ends exactly right.
    processor.kill();
    let_killed_member_expire().await;
    let _processor = env.processor();
    assert_sums(&env, &expected).await;
}

#[tokio::test]
async fn poison_records_go_to_the_dlq_and_do_not_block() {
    let env = TestEnv::new("proc-dlq");
    env.create_topics();
    let customer = format!("cus_dlq{}", env.id.replace('-', ""));
    let good = events::stripe_charge("evt_dlq_ok", "ch_dlq_ok", &customer, 500, 1_740_830_400);
    let unmappable = events::stripe_charge("evt_dlq_bad", "ch_dlq_bad", &customer, 1, 1)
        .replace("\"amount\":1", "\"amount\":\"lots\"")
        .replace("\"id\":\"ch_dlq_bad\"", "\"idx\":\"none\"");
    let key = format!("poison-{}", env.id);
    let records = vec![
        (key.clone(), b"\x00garbage, not avro".to_vec()),
        (
            key.clone(),
            raw(
                "stripe",
                "stripe",
                "evt_dlq_bad",
                "charge.succeeded",
                &unmappable,
            )
            .encode(),
        ),
        (
            key.clone(),
            raw("stripe", "stripe", "evt_dlq_ok", "charge.succeeded", &good).encode(),
        ),
    ];
    produce_stripe(&env, &records).await;
    let _processor = env.processor();
    let s = wait_state(&env, "customers", &customer, |_| true).await;
    assert_eq!(s["state"]["total_charged"], 500);
    let dead = eventually("two dead letters", Duration::from_secs(30), || async {
        let d: Vec<_> = kafka::read_all(&env.brokers, "hooklog.dlq")
            .into_iter()
            .filter(|r| r.key_str() == key)
            .collect();
        (d.len() >= 2).then_some(d)
    })
    .await;
    assert_eq!(dead.len(), 2);
    assert_eq!(
        dead[0].value.as_deref(),
        Some(&b"\x00garbage, not avro"[..]),
        "original value kept"
    );
    assert!(dead[0]
        .header("hooklog-dlq-reason")
        .unwrap()
        .contains("single-object"));
    assert!(
        dead[1]
            .header("hooklog-dlq-reason")
            .unwrap()
            .contains("not a number"),
        "{:?}",
        dead[1].header("hooklog-dlq-reason")
    );
    assert_eq!(
        dead[1].header("hooklog-dlq-topic"),
        Some(env.topic("stripe"))
    );
    assert_eq!(
        metric(
            &env.processor_url(),
            "hooklog_processor_dlq_records_total",
            &[]
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn a_crash_between_apply_and_changelog_still_publishes_the_state() {
    let env = TestEnv::new("proc-crash");
    env.create_topics();
    let customer = format!("cus_crash{}", env.id.replace('-', ""));
    let body = events::stripe_charge("evt_crash_1", "ch_crash_1", &customer, 4200, 1_740_830_400);
    kafka::produce_all(
        &kafka::producer(&env.brokers),
        &env.topic("stripe"),
        &[(
            "evt_crash_1".into(),
            raw("stripe", "stripe", "evt_crash_1", "charge.succeeded", &body).encode(),
        )],
    )
    .await;
    let mut crashing = env.processor_service();
    crashing.env("HOOKLOG_FAULT", "crash_before_changelog");
    crashing.start();
    assert!(
        crashing.wait_exit(Duration::from_secs(60)),
        "the fault hook did not fire"
    );
    // Redis has the state, the changelog does not.
    let mut conn = env.redis();
    let key = format!("{}{{customers}}:v1:e:{customer}", env.prefix);
    let total: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg("total_charged")
        .query(&mut conn)
        .unwrap();
    assert_eq!(total.as_deref(), Some("4200"));
    let in_changelog = || {
        kafka::read_all(&env.brokers, "hooklog.state.customers")
            .into_iter()
            .filter(|r| r.key_str() == customer)
            .count()
    };
    assert_eq!(in_changelog(), 0);

    // The crashed member left without a goodbye, like a kill -9.
    let_killed_member_expire().await;
    let processor = env.processor();
    eventually(
        "changelog after redelivery",
        Duration::from_secs(60),
        || async { (in_changelog() > 0).then_some(()) },
    )
    .await;
    // The rebalance that gave it the partitions is in its log.
    let stripe = env.topic("stripe");
    assert!(
        processor
            .log_text()
            .lines()
            .any(|l| l.contains("Partitions assigned.") && l.contains(&format!("{stripe}/0"))),
        "{}",
        processor.log_text()
    );
    let url = env.processor_url();
    eventually(
        "the redelivery was a duplicate",
        Duration::from_secs(30),
        || async {
            (metric(
                &url,
                "hooklog_processor_duplicate_events_total",
                &["customers"],
            )
            .await
                == 1.0)
                .then_some(())
        },
    )
    .await;
    let s = state(&env, "customers", &customer).await.unwrap();
    assert_eq!(s["state"]["total_charged"], 4200, "applied once");
    let _ = shared_stack();
}

/// On a Redis with its default `hash-max-listpack-value` (64) and a memory
/// limit that evicts keys, the processor warns at start that entities with
/// long event ids take more memory and that eviction would drop entities
/// and dedup markers; on the tests' Redis, set as recommended (128, no
/// limit), it does not.
#[tokio::test]
async fn warns_about_redis_settings_that_cost_memory_or_correctness() {
    let stack = shared_stack();
    let (_redis, url) = private_redis(
        "redis-default",
        &["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"],
    );
    // The warnings' fields, from the processor's JSON log lines.
    let warned = |log: &str, field: &str, other: &str| {
        log.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["level"] == "WARN" && l.get(field).is_some())
            .map(|l| (l[field].clone(), l[other].clone()))
    };
    let listpack = |log: &str| warned(log, "hash_max_listpack_value", "recommended");
    let eviction = |log: &str| warned(log, "maxmemory_policy", "maxmemory");
    let default = TestEnv::on("proc-listpack", &stack.brokers, &url, "");
    default.create_topics();
    let processor = default.processor();
    let log = processor.log_text();
    assert_eq!(listpack(&log), Some((64.into(), 128.into())), "{log}");
    assert_eq!(
        eviction(&log),
        Some(("allkeys-lru".into(), (256u64 << 20).into())),
        "{log}"
    );

    let recommended = TestEnv::on("proc-listpack-ok", &stack.brokers, &stack.redis_url, "");
    recommended.create_topics();
    let processor = recommended.processor();
    let log = processor.log_text();
    assert_eq!(listpack(&log), None, "{log}");
    assert_eq!(eviction(&log), None, "{log}");
}

/// On a Redis without `SMISMEMBER` or `ZADD … GT` (Redis before 6.2; here
/// a current Redis with the command renamed away) the processor and its
/// rebuild refuse to start with a message naming the command and the Redis
/// they need, instead of failing every batch; on the tests' Redis they
/// start.
#[tokio::test]
async fn refuses_a_redis_without_the_commands_it_needs() {
    let stack = shared_stack();
    for (renamed, named) in [("SMISMEMBER", "SMISMEMBER"), ("ZADD", "ZADD GT")] {
        let (_redis, url) = private_redis("redis-old", &["--rename-command", renamed, ""]);
        let old = TestEnv::on("proc-old-redis", &stack.brokers, &url, "");
        old.create_topics();
        let refused = |text: &str| {
            text.contains(&format!("refused {named} ")) && text.contains("Redis 6.2 or later")
        };

        let mut processor = old.processor_service();
        processor.start();
        assert!(
            processor.wait_exit(Duration::from_secs(30)),
            "the processor kept running on a Redis without {named}: {}",
            processor.log_text()
        );
        let log = processor.log_text();
        assert!(refused(&log), "{log}");

        let (ok, out) = old.processor_cmd(&["rebuild", "--projection", "orders"]);
        assert!(!ok && refused(&out), "{out}");
    }

    let current = TestEnv::on("proc-new-redis", &stack.brokers, &stack.redis_url, "");
    current.create_topics();
    let processor = current.processor();
    assert!(!processor.log_text().contains("Redis 6.2 or later"));
}

/// A full Redis (`maxmemory` reached, `noeviction`) refuses every write with
/// `OOM`. The processor waits at start instead of exiting, pauses
/// mid-stream (the retries are counted, nothing is applied, `/readyz` says
/// paused but stays 200: the read API still answers), and once there is
/// room applies every record exactly once.
#[tokio::test]
async fn a_full_redis_pauses_the_processor_until_there_is_room() {
    let stack = shared_stack();
    let (_redis, url) = private_redis("redis-full", &[]);
    let set_maxmemory = |bytes: &str| {
        let mut conn = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection())
            .expect("redis");
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .query::<()>(&mut conn)
            .expect("CONFIG SET maxmemory");
    };
    let (env, records, expected) = charge_env("proc-full", &stack.brokers, &url, 1000, 10);
    let producer = kafka::producer(&env.brokers);

    // Full before the processor starts: it waits.
    set_maxmemory("1");
    let mut processor = env.processor_service();
    processor.start();
    eventually(
        "the processor reports the full Redis",
        Duration::from_secs(30),
        || async { processor.log_text().contains("OOM").then_some(()) },
    )
    .await;
    assert!(processor.is_running(), "{}", processor.log_text());
    set_maxmemory("0");
    let ready = format!("{}/readyz", env.processor_url());
    wait_http_ok(&ready, Duration::from_secs(30));
    kafka::produce_all(&producer, &env.topic("stripe"), &records[..500]).await;
    wait_applied(&env, 500.0).await;

    // Full mid-stream: it pauses, and applies nothing it cannot write.
    set_maxmemory("1");
    kafka::produce_all(&producer, &env.topic("stripe"), &records[500..]).await;
    reports_pause_and_still_serves(&env, &expected).await;
    assert_retried(&env, "redis").await;
    assert_eq!(applied(&env).await, 500.0);

    set_maxmemory("0");
    assert_sums(&env, &expected).await;
    // The metric follows the write by a moment; then every event counts
    // once as applied.
    assert_eq!(wait_applied(&env, 1000.0).await, 1000.0);
}

/// The broker goes away mid-stream (cut behind a proxy) and comes back:
/// the processor pauses once it cannot get the changelog acknowledged
/// (still serving reads), then carries on without a restart. Every event
/// is applied once, and each customer's last changelog record is its final
/// state.
#[tokio::test]
async fn broker_outage_pauses_and_resumes_without_loss() {
    let (stack, proxy) = Stack::start_behind_proxy();
    let (env, records, expected) =
        charge_env("proc-broker", &stack.brokers, &stack.redis_url, 4000, 20);
    let producer = kafka::producer(&env.brokers);
    kafka::produce_all(&producer, &env.topic("stripe"), &records).await;
    let _processor = env.processor();
    wait_applied(&env, 400.0).await;

    proxy.down();
    reports_pause_and_still_serves(&env, &expected).await;
    assert_retried(&env, "kafka").await;
    proxy.up();

    assert_sums(&env, &expected).await;
    assert_eq!(wait_applied(&env, 4000.0).await, 4000.0);
    // The changelog follows the apply: wait for each customer's last record
    // to count every charge, then compare it whole.
    let last = eventually(
        "the changelog's final states",
        Duration::from_secs(60),
        || async {
            let mut last: HashMap<String, Value> = HashMap::new();
            for r in kafka::read_all(&env.brokers, "hooklog.state.customers") {
                let state =
                    serde_json::from_slice(r.value.as_deref().expect("value")).expect("json");
                last.insert(r.key_str(), state);
            }
            expected
                .iter()
                .all(|(c, (_, n))| {
                    last.get(c)
                        .is_some_and(|s| s["state"]["charges"].as_i64() >= Some(*n))
                })
                .then_some(last)
        },
    )
    .await;
    for (customer, (sum, count)) in &expected {
        let state = &last[customer]["state"];
        assert_eq!(
            state["charges"].as_i64(),
            Some(*count),
            "{customer}: {state}"
        );
        assert_eq!(state["total_charged"].as_i64(), Some(*sum), "{customer}");
    }
}

/// Waits until `/readyz` reports a pause, and checks that it stays 200 and
/// the read API still answers meanwhile: a stalled apply leaves reads up.
async fn reports_pause_and_still_serves(env: &TestEnv, expected: &Expected) {
    let ready = format!("{}/readyz", env.processor_url());
    let body = eventually(
        "readyz reports the pause",
        Duration::from_secs(60),
        || async { get_json(&ready).await.filter(|b| b["paused"] == true) },
    )
    .await;
    assert_eq!(body["redis"], true, "{body}");
    let customer = expected.keys().next().expect("a customer");
    assert!(
        state(env, "customers", customer).await.is_some(),
        "the read API answers during the pause"
    );
}

/// A processor that waits for one replica (`redis.wait_replicas = 1`, plus
/// `settings` as environment) on a Redis of its own: half of `n` charges
/// applied, then the replica killed and the rest produced, until the
/// processor reports the pause while its read API still serves.
struct ReplicaDown {
    env: TestEnv,
    expected: Expected,
    processor: hooklog_e2e::Service,
    replica: hooklog_e2e::Service,
    _primary: hooklog_e2e::Service,
}

async fn replica_down_mid_stream(name: &str, n: usize, settings: &[(&str, &str)]) -> ReplicaDown {
    let stack = shared_stack();
    let (primary, url) = private_redis(&format!("{name}-primary"), &[]);
    let mut replica = private_replica(&format!("{name}-replica"), &url);
    let (env, records, expected) = charge_env(name, &stack.brokers, &url, n, 10);
    let producer = kafka::producer(&env.brokers);
    let mut processor = env.processor_service();
    processor.env("HOOKLOG_REDIS__WAIT_REPLICAS", "1");
    for (k, v) in settings {
        processor.env(k, v);
    }
    processor.start();
    wait_http_ok(
        &format!("{}/readyz", env.processor_url()),
        Duration::from_secs(30),
    );
    let half = n / 2;
    kafka::produce_all(&producer, &env.topic("stripe"), &records[..half]).await;
    wait_applied(&env, half as f64).await;

    replica.kill();
    kafka::produce_all(&producer, &env.topic("stripe"), &records[half..]).await;
    reports_pause_and_still_serves(&env, &expected).await;
    ReplicaDown {
        env,
        expected,
        processor,
        replica,
        _primary: primary,
    }
}

/// With `redis.wait_replicas = 1` an apply counts only once a replica has
/// its writes: while the replica is down the processor pauses (the primary
/// alone is not enough), and when it is back every event is applied
/// exactly once.
#[tokio::test]
async fn waits_for_a_replica_when_asked() {
    let mut t = replica_down_mid_stream(
        "proc-wait",
        1000,
        &[("HOOKLOG_REDIS__WAIT_TIMEOUT_MS", "300")],
    )
    .await;
    let log = t.processor.log_text();
    assert!(log.contains("0 of 1 within 300 ms"), "{log}");
    assert_eq!(applied(&t.env).await, 500.0);

    t.replica.start();
    assert_sums(&t.env, &t.expected).await;
}

/// The writes that wait for a replica, and their `WAIT`, use connections
/// of their own: with `watched_commits = false` (every write through the
/// script) and the replica down, the processor pauses on 3-second waits
/// while its read API answers at once.
#[tokio::test]
async fn reads_do_not_queue_behind_a_replica_wait() {
    let settings = [
        ("HOOKLOG_REDIS__WAIT_TIMEOUT_MS", "3000"),
        ("HOOKLOG_REDIS__WATCHED_COMMITS", "false"),
    ];
    let mut t = replica_down_mid_stream("proc-wait-reads", 400, &settings).await;
    let customer = t.expected.keys().next().expect("a customer");
    hooklog_e2e::reads_answer_at_once("the read API", || async {
        state(&t.env, "customers", customer).await.is_some()
    })
    .await;
    let log = t.processor.log_text();
    assert!(log.contains("0 of 1 within 3000 ms"), "{log}");

    t.replica.start();
    assert_sums(&t.env, &t.expected).await;
}

/// Ingest and the processor reach the broker over TLS only (a
/// TLS-terminating proxy in front of Tansu, trusted through
/// `kafka.properties`): the seed's signed `order.shipped` is acknowledged
/// and projected.
#[tokio::test]
async fn kafka_over_tls_from_webhook_to_projection() {
    let (stack, _proxy, ca) = Stack::start_behind_tls_proxy();
    let tls = format!(
        "[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"{}\"\n",
        ca.display()
    );
    let env = TestEnv::on("tls", &stack.brokers, &stack.redis_url, &tls);
    seed_order_goes_through(&env).await;
}

/// The processor reaches Redis over TLS only (`rediss://`, trusting the
/// test's own CA through `redis.tls_ca_file`): the seed's order is applied
/// and read back.
#[tokio::test]
async fn redis_over_tls() {
    let stack = shared_stack();
    let (_redis, url, ca) = hooklog_e2e::private_tls_redis("redis-tls");
    let env = TestEnv::on(
        "redis-tls",
        &stack.brokers,
        &url,
        &format!("[redis]\ntls_ca_file = \"{}\"", ca.display()),
    );
    seed_order_goes_through(&env).await;
}

/// Starts ingest and the processor, sends the seed's signed
/// `order.shipped` and waits until the read API serves it.
async fn seed_order_goes_through(env: &TestEnv) {
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    let body = events::SEED_ORDER_SHIPPED;
    let receipt = send(env, "fulfillment", "hmac-sha256", body, "").await;
    assert_eq!(receipt["topic"], env.topic("fulfillment"), "{receipt}");
    let order = wait_state(env, "orders", "ORD-633261", |s| {
        s["state"]["status"] == "shipped"
    })
    .await;
    assert_eq!(order["last_event_id"], receipt["event_id"]);
}
