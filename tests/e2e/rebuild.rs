//! Rebuild and verify end to end: state restored after FLUSHALL, rebuild
//! under live traffic, a definition change filling history, corruption
//! detected, and a rebuild killed half-way leaving readers untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use hooklog_e2e::events::{self, raw};
use hooklog_e2e::sign::{self, now};
use hooklog_e2e::{eventually, get_json, kafka, metric, secret, Stack, TestEnv, ADMIN_KEY};
use hooklog_processor::projection::store::Store;
use hooklog_processor::rebuild::switch;
use serde_json::Value;

use crate::ingest::post;
use crate::processor::charge_stream;

/// Every entity of a projection as the read API serves it (minus version).
async fn snapshot(env: &TestEnv, projection: &str) -> BTreeMap<String, Value> {
    let mut conn = env.redis();
    let current: Option<u64> = redis::cmd("GET")
        .arg(format!("{}{{{projection}}}:current", env.prefix))
        .query(&mut conn)
        .unwrap();
    let prefix = format!(
        "{}{{{projection}}}:v{}:e:",
        env.prefix,
        current.unwrap_or(1)
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut conn)
        .unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let key = k.strip_prefix(&prefix).unwrap().to_owned();
        let mut v = get_json(&format!(
            "{}/v1/projections/{projection}/{key}",
            env.processor_url()
        ))
        .await
        .unwrap();
        v.as_object_mut().unwrap().remove("version");
        out.insert(key, v);
    }
    out
}

async fn wait_applied(env: &TestEnv, projection: &str, n: f64) {
    let url = env.processor_url();
    let label = format!("projection=\"{projection}\"");
    eventually(
        &format!("{n} applied to {projection}"),
        Duration::from_secs(120),
        || async {
            (metric(&url, "hooklog_processor_applied_events_total", &[&label]).await >= n)
                .then_some(())
        },
    )
    .await;
}

/// Orders (via ingest) and charges for customers who signed up (direct).
async fn load(env: &TestEnv, orders: usize, charges: usize) {
    let mut records = Vec::new();
    for c in 0..20 {
        let customer = format!("cus_{}_{c}", env.id.replace('-', ""));
        let body = events::customer_signed_up(
            &format!("evt_su_{}_{c}", env.id),
            &customer,
            &format!("c{c}@example.com"),
        );
        records.push((
            customer.clone(),
            raw(
                "accounts",
                "hmac-sha256",
                &format!("evt_su_{}_{c}", env.id),
                "customer.signed_up",
                &body,
            )
            .encode(),
        ));
    }
    kafka::produce_all(
        &kafka::producer(&env.brokers),
        &env.topic("accounts"),
        &records,
    )
    .await;
    let (charge_records, _) = charge_stream(env, charges, 20);
    kafka::produce_all(
        &kafka::producer(&env.brokers),
        &env.topic("stripe"),
        &charge_records,
    )
    .await;
    for i in 0..orders {
        let body = format!(
            r#"{{"event_type":"order.shipped","order_id":"ORD-{}-{}","shipping_carrier":"UPS","tracking_number":"1Z{i:08}","shipped_at":"2025-03-01T12:{:02}:00Z"}}"#,
            env.id,
            i % 50,
            i % 60
        );
        let headers = sign::headers(
            "hmac-sha256",
            secret("fulfillment"),
            body.as_bytes(),
            now(),
            "",
        );
        assert_eq!(
            post(env, "fulfillment", &headers, body.into_bytes())
                .await
                .status,
            200
        );
    }
}

fn rebuild(env: &TestEnv, projection: &str) -> String {
    let (ok, out) =
        env.processor_cmd(&["rebuild", "--projection", projection, "--grace-secs", "0"]);
    assert!(ok, "rebuild {projection} failed: {out}");
    out
}

#[tokio::test]
async fn flushall_then_rebuild_restores_identical_state() {
    let stack = Stack::start();
    let env = TestEnv::on("rb-flush", &stack.brokers, &stack.redis_url, "");
    env.create_topics();
    let _ingest = env.ingest();
    let mut processor = env.processor();
    load(&env, 300, 3000).await;
    wait_applied(&env, "customers", 3020.0).await;
    wait_applied(&env, "orders", 300.0).await;
    let mut before = BTreeMap::new();
    for p in ["orders", "charges", "customers"] {
        before.insert(p, snapshot(&env, p).await);
    }
    assert_eq!(before["orders"].len(), 50);
    assert_eq!(before["charges"].len(), 3000);
    assert_eq!(before["customers"].len(), 20);

    processor.kill();
    let _: () = redis::cmd("FLUSHALL").query(&mut env.redis()).unwrap();
    let _processor = env.processor();
    // Each replays only the topics of the sources its rules name.
    for (p, replayed) in [("orders", 300), ("charges", 3000), ("customers", 3020)] {
        let out = rebuild(&env, p);
        assert!(
            out.contains(&format!(", {replayed} records replayed")),
            "{out}"
        );
        assert!(out.contains("ETA"), "progress is shown: {out}");
        assert_eq!(
            snapshot(&env, p).await,
            before[p],
            "{p} differs after rebuild"
        );
    }
}

#[tokio::test]
async fn rebuild_under_live_traffic_counts_every_event_once() {
    // Own broker: Tansu's fetches slow down as its sqlite file grows, and
    // tests running in parallel on one broker make that worse.
    let stack = Stack::start();
    let env = TestEnv::on("rb-live", &stack.brokers, &stack.redis_url, "");
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    load(&env, 0, 1500).await;
    wait_applied(&env, "customers", 1520.0).await;

    // Keep charges flowing through ingest during the rebuild.
    let sender = {
        let (url, id) = (env.ingest_url(), env.id.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for i in 0..150 {
                let customer = format!("cus_{}_{}", id.replace('-', ""), i % 20);
                let body = events::stripe_charge(
                    &format!("evt_live_{id}_{i}"),
                    &format!("ch_live_{id}_{i}"),
                    &customer,
                    1000 + i,
                    now(),
                );
                let headers = sign::headers("stripe", secret("stripe"), body.as_bytes(), now(), "");
                let mut req = reqwest::Client::new()
                    .post(format!("{url}/webhooks/stripe"))
                    .body(body);
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                assert_eq!(req.send().await.unwrap().status(), 200);
                sent.push((customer, 1000 + i));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rebuilt = rebuild(&env, "customers");
    assert!(rebuilt.contains("version 2 is current"), "{rebuilt}");
    let sent = sender.await.unwrap();
    assert!(sent.len() == 150);

    // Aggregates count every event exactly once across the switch.
    let (_, expected) = charge_stream(&env, 1500, 20);
    let mut mine = expected.clone();
    for (customer, amount) in &sent {
        let e = mine.get_mut(customer).unwrap();
        e.0 += amount;
        e.1 += 1;
    }
    for (customer, (sum, count)) in &mine {
        let s = eventually("customer state", Duration::from_secs(30), || async {
            get_json(&format!(
                "{}/v1/projections/customers/{customer}",
                env.processor_url()
            ))
            .await
            .filter(|s| s["state"]["charges"].as_i64() >= Some(*count))
        })
        .await;
        assert_eq!(s["version"], 2);
        assert_eq!(s["state"]["charges"].as_i64(), Some(*count), "{customer}");
        assert_eq!(
            s["state"]["total_charged"].as_i64(),
            Some(*sum),
            "{customer}"
        );
    }
    let (ok, out) = env.processor_cmd(&["verify", "--projection", "customers"]);
    assert!(ok, "verify found differences: {out}");
    assert!(out.contains("20 entities compared, 0 differences"), "{out}");
}

#[tokio::test]
async fn a_new_field_is_filled_from_history_and_corruption_is_detected() {
    let stack = Stack::start();
    let env = TestEnv::on("rb-field", &stack.brokers, &stack.redis_url, "");
    env.create_topics();
    let _ingest = env.ingest();
    let mut processor = env.processor();
    load(&env, 100, 0).await;
    wait_applied(&env, "orders", 100.0).await;
    let key = format!("ORD-{}-7", env.id);
    let before = get_json(&format!(
        "{}/v1/projections/orders/{key}",
        env.processor_url()
    ))
    .await
    .unwrap();
    assert!(before["state"].get("tracking").is_none());

    // The operator changes the definition, rolls the processors, rebuilds.
    env.write_config(&env.projections_toml(true));
    processor.terminate();
    let _processor = env.processor();
    rebuild(&env, "orders");
    let after = get_json(&format!(
        "{}/v1/projections/orders/{key}",
        env.processor_url()
    ))
    .await
    .unwrap();
    assert_eq!(
        after["state"]["tracking"], after["state"]["tracking_number"],
        "historical entity got the new field"
    );
    assert!(after["state"]["tracking"].is_string());

    let (ok, out) = env.processor_cmd(&["verify", "--projection", "orders"]);
    assert!(ok, "{out}");
    assert!(out.contains("50 entities compared, 0 differences"), "{out}");

    // Corrupt one live entity: verify must notice and fail.
    let mut conn = env.redis();
    let _: () = redis::cmd("HSET")
        .arg(format!("{}{{orders}}:v2:e:{key}", env.prefix))
        .arg("shipping_carrier")
        .arg("\"Pigeon\"")
        .query(&mut conn)
        .unwrap();
    let (ok, out) = env.processor_cmd(&["verify", "--projection", "orders"]);
    assert!(!ok, "verify missed the corruption: {out}");
    assert!(out.contains(&format!("DIFF orders/{key}")), "{out}");
    assert!(out.contains("1 differences"), "{out}");
    // The scratch version is gone.
    let keys = version_keys(&mut conn, &env, "orders", 3);
    assert!(
        keys.is_empty(),
        "scratch version left behind: {}",
        keys.len()
    );
}

/// A rebuild killed outright: readers stay on the old version, its
/// `building` lease lapses so live processors stop dual-writing into the
/// partial version, and the next rebuild deletes that version. A rebuild
/// killed during its grace period leaves the previous version, which a
/// later rebuild or `prune` deletes once the grace is over (not before).
#[tokio::test]
async fn a_rebuild_killed_half_way_leaves_readers_on_the_old_version() {
    let stack = Stack::start();
    let env = TestEnv::on("rb-kill", &stack.brokers, &stack.redis_url, "");
    env.create_topics();
    let _processor = env.processor();
    let (records, expected) = charge_stream(&env, 3100, 20);
    let producer = kafka::producer(&env.brokers);
    kafka::produce_all(&producer, &env.topic("stripe"), &records[..3000]).await;
    wait_applied(&env, "customers", 3000.0).await;
    let before = snapshot(&env, "customers").await;

    let mut rebuilder = env.processor_command(
        "rebuild",
        // Throttled so the kill lands half-way (about 6 s in all).
        &[
            "rebuild",
            "--projection",
            "customers",
            "--grace-secs",
            "0",
            "--max-records-per-sec",
            "500",
            "--lease-secs",
            "2",
        ],
    );
    rebuilder.start();
    // Kill it as soon as it has started writing version 2.
    let mut conn = env.redis();
    let building = format!("{}{{customers}}:building", env.prefix);
    let started = std::time::Instant::now();
    loop {
        let b: Option<u64> = redis::cmd("GET").arg(&building).query(&mut conn).unwrap();
        if b == Some(2) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "rebuild never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(1500));
    rebuilder.kill();
    assert!(
        !rebuilder.log_text().contains("is current"),
        "the rebuild finished before the kill"
    );

    let current: Option<u64> = redis::cmd("GET")
        .arg(format!("{}{{customers}}:current", env.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(current, None, "readers still on version 1");
    assert_eq!(
        snapshot(&env, "customers").await,
        before,
        "old version untouched"
    );

    // The dead rebuild's lease lapses: live applies stop writing version 2.
    eventually("the lease to lapse", Duration::from_secs(10), || async {
        let b: Option<u64> = redis::cmd("GET")
            .arg(&building)
            .query(&mut env.redis())
            .unwrap();
        b.is_none().then_some(())
    })
    .await;
    let partial = entity_hashes(&mut conn, &env, "customers", 2);
    assert!(!partial.is_empty(), "the killed rebuild wrote nothing");
    kafka::produce_all(&producer, &env.topic("stripe"), &records[3000..]).await;
    wait_applied(&env, "customers", 3100.0).await;
    assert_eq!(
        entity_hashes(&mut conn, &env, "customers", 2),
        partial,
        "live applies still wrote the lapsed version"
    );
    let live = snapshot(&env, "customers").await;
    assert_ne!(live, before);

    // Run it again once the dead rebuild's lock expired: it deletes the
    // partial version and completes; killed during its grace period, it
    // leaves version 1 behind. The grace is long enough for the checks
    // within it on a loaded machine.
    const GRACE: Duration = Duration::from_secs(15);
    let mut second = eventually("a second rebuild", Duration::from_secs(60), || async {
        let mut second = env.processor_command(
            "rebuild-2",
            &[
                "rebuild",
                "--projection",
                "customers",
                "--grace-secs",
                &GRACE.as_secs().to_string(),
            ],
        );
        second.start();
        let started = std::time::Instant::now();
        while !second.log_text().contains("keeping version") && second.is_running() {
            assert!(started.elapsed() < Duration::from_secs(60), "rebuild stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = second.log_text();
        if out.contains("keeping version 1") {
            return Some(second);
        }
        assert!(out.contains("already running"), "{out}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        None
    })
    .await;
    let switched = std::time::Instant::now();
    second.kill();
    let out = second.log_text();
    assert!(out.contains("3100 records replayed"), "{out}");
    assert!(version_keys(&mut conn, &env, "customers", 2).is_empty());
    assert!(!version_keys(&mut conn, &env, "customers", 1).is_empty());
    assert_eq!(snapshot(&env, "customers").await, live);
    for (customer, (sum, _)) in &expected {
        let s = get_json(&format!(
            "{}/v1/projections/customers/{customer}",
            env.processor_url()
        ))
        .await
        .unwrap();
        assert_eq!(s["state"]["total_charged"].as_i64(), Some(*sum));
        assert_eq!(
            s["version"], 3,
            "the killed rebuild's version 2 was discarded"
        );
    }

    // Within version 1's grace period a rebuild keeps it, and so does
    // `prune`; after it, `prune` (or the next rebuild) deletes it.
    rebuild(&env, "customers");
    let prune = || env.processor_cmd(&["prune", "--projection", "customers"]);
    let (ok, out) = prune();
    assert!(ok && out.contains("customers: nothing to delete"), "{out}");
    assert!(
        !version_keys(&mut conn, &env, "customers", 1).is_empty(),
        "version 1 deleted during its grace period"
    );
    assert!(
        switched.elapsed() < GRACE,
        "too slow to check the grace period"
    );
    tokio::time::sleep((GRACE + Duration::from_secs(1)).saturating_sub(switched.elapsed())).await;
    let (ok, out) = prune();
    assert!(
        ok && out.contains("customers: deleted versions [1]"),
        "{out}"
    );
    assert!(
        version_keys(&mut conn, &env, "customers", 1).is_empty(),
        "version 1 left behind"
    );
    assert_eq!(snapshot(&env, "customers").await, live);
    let versions: Vec<u64> = redis::cmd("ZRANGE")
        .arg(format!("{}{{customers}}:versions", env.prefix))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(versions, vec![4], "only the current version is listed");
}

/// A rebuild that fills Redis (`maxmemory` with `noeviction`) gives up at
/// once rather than waiting for room: it deletes its partial version and
/// clears `building`, so readers stay on the old version, the live
/// processors stop dual-writing and, with the memory back, keep applying.
/// With room, the same rebuild succeeds.
#[tokio::test]
async fn a_rebuild_that_fills_redis_removes_its_partial_version() {
    let stack = hooklog_e2e::shared_stack();
    let (_redis, url) = hooklog_e2e::private_redis("redis-rb-full", &[]);
    let env = TestEnv::on("rb-full", &stack.brokers, &url, "");
    env.create_topics();
    let _processor = env.processor();
    let (records, _) = charge_stream(&env, 10_100, 20);
    let producer = kafka::producer(&env.brokers);
    kafka::produce_all(&producer, &env.topic("stripe"), &records[..10_000]).await;
    wait_applied(&env, "customers", 10_000.0).await;
    let before = snapshot(&env, "customers").await;

    // Room for a little more than what is there (the rebuild's own
    // connections take some), not for a second copy of the customers'
    // 10,000 remembered event ids (~700 KB).
    let mut conn = env.redis();
    let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    let set_maxmemory = |conn: &mut redis::Connection, bytes: u64| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .query::<()>(conn)
            .unwrap();
    };
    set_maxmemory(&mut conn, used + 384 * 1024);
    let mut rebuilder = env.processor_command(
        "rebuild",
        &["rebuild", "--projection", "customers", "--grace-secs", "0"],
    );
    rebuilder.start();
    assert!(
        rebuilder.wait_exit(Duration::from_secs(60)),
        "the rebuild kept waiting for room: {}",
        rebuilder.log_text()
    );
    let out = rebuilder.log_text();
    assert!(!out.contains("is current"), "the rebuild fit: {out}");
    assert!(
        out.contains("Redis is full") && out.contains("partial version 2 was deleted"),
        "{out}"
    );
    let building: Option<u64> = redis::cmd("GET")
        .arg(format!("{}{{customers}}:building", env.prefix))
        .query(&mut conn)
        .unwrap();
    assert_eq!(building, None);
    let partial = version_keys(&mut conn, &env, "customers", 2);
    assert!(
        partial.is_empty(),
        "{} keys of version 2 left",
        partial.len()
    );
    assert_eq!(snapshot(&env, "customers").await, before);

    // Its memory is back: live applies go on under the same limit.
    kafka::produce_all(&producer, &env.topic("stripe"), &records[10_000..]).await;
    wait_applied(&env, "customers", 10_100.0).await;

    set_maxmemory(&mut conn, 0);
    let after_live = snapshot(&env, "customers").await;
    rebuild(&env, "customers");
    assert_eq!(snapshot(&env, "customers").await, after_live);
}

/// Every key of `version` of `projection` in `env`'s namespace.
fn version_keys(
    conn: &mut redis::Connection,
    env: &TestEnv,
    projection: &str,
    version: u64,
) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(format!("{}{{{projection}}}:v{version}:*", env.prefix))
        .query(conn)
        .unwrap()
}

/// Every entity hash of `version` of `projection`, by key.
fn entity_hashes(
    conn: &mut redis::Connection,
    env: &TestEnv,
    projection: &str,
    version: u64,
) -> BTreeMap<String, BTreeMap<String, String>> {
    version_keys(conn, env, projection, version)
        .into_iter()
        .filter(|k| k.contains(":e:"))
        .map(|k| {
            let fields = redis::cmd("HGETALL").arg(&k).query(conn).unwrap();
            (k, fields)
        })
        .collect()
}

/// The switch makes a rebuilt version current only while `building` still
/// names it: once its lease lapsed (or another rebuild took over), live
/// applies may have stopped dual-writing into it.
#[tokio::test]
async fn a_rebuild_switches_readers_only_while_its_building_pointer_holds() {
    let url = hooklog_e2e::shared_stack().redis_url.clone();
    let store = Store::connect(&url, &hooklog_e2e::unique("e2e:switch:"), 600)
        .await
        .unwrap();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let get = |conn: &mut redis::Connection, key: String| -> Option<u64> {
        redis::cmd("GET").arg(key).query(conn).unwrap()
    };
    let (current, building) = (store.current_key("orders"), store.building_key("orders"));

    // No `building` (lapsed), then one naming another version: refused.
    assert!(!switch(&store, "orders", 2, 1, 1_000).await.unwrap());
    redis::cmd("SET")
        .arg(&building)
        .arg(3)
        .query::<()>(&mut conn)
        .unwrap();
    assert!(!switch(&store, "orders", 2, 1, 1_000).await.unwrap());
    assert_eq!(get(&mut conn, current.clone()), None);
    assert_eq!(get(&mut conn, building.clone()), Some(3));

    // Its own: switched, `building` gone, the previous version listed as
    // deletable from the given time.
    assert!(switch(&store, "orders", 3, 1, 1_000).await.unwrap());
    assert_eq!(get(&mut conn, current), Some(3));
    assert_eq!(get(&mut conn, building), None);
    let listed: Vec<(u64, u64)> = redis::cmd("ZRANGE")
        .arg(store.versions_key("orders"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut conn)
        .unwrap();
    assert_eq!(listed, vec![(1, 1_000)]);
}

/// `POST /v1/projections/{name}/rebuild` with a key status: (status, body,
/// `WWW-Authenticate`).
async fn post_rebuild(env: &TestEnv, projection: &str, key: Option<&str>) -> (u16, Value, String) {
    let mut req = reqwest::Client::new()
        .post(format!(
            "{}/v1/projections/{projection}/rebuild",
            env.processor_url()
        ))
        .timeout(Duration::from_secs(10));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.expect("rebuild request");
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, resp.json().await.unwrap_or(Value::Null), challenge)
}

/// The HTTP rebuild is an admin endpoint: without one of
/// `processor.admin_keys` it starts nothing; with one it rebuilds and
/// switches readers; with none configured it is off.
#[tokio::test]
async fn the_rebuild_endpoint_needs_an_admin_key() {
    let env = TestEnv::new("rb-admin");
    env.create_topics();
    let _ingest = env.ingest();
    let processor = env.processor();
    load(&env, 30, 0).await;
    wait_applied(&env, "orders", 30.0).await;
    let before = snapshot(&env, "orders").await;
    assert_eq!(before.len(), 30);

    for key in [None, Some("not-the-key"), Some(hooklog_e2e::API_KEY)] {
        let (status, body, challenge) = post_rebuild(&env, "orders", key).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{key:?}"
        );
        assert_eq!(challenge, "Bearer");
    }
    let (status, body, _) = post_rebuild(&env, "nope", Some(ADMIN_KEY)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("unknown_projection"))
    );
    let current = |env: &TestEnv| {
        let key = format!("{}{{orders}}:current", env.prefix);
        let v: Option<u64> = redis::cmd("GET").arg(key).query(&mut env.redis()).unwrap();
        v.unwrap_or(1)
    };
    assert_eq!(current(&env), 1, "a refused request started a rebuild");

    // Another rebuild, verify or prune holds the projection's lock (any
    // replica, or the CLI): refused, not "started" in vain.
    let lock = format!("{}{{orders}}:rebuild_lock", env.prefix);
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("another-process")
        .arg("EX")
        .arg(30)
        .query(&mut env.redis())
        .unwrap();
    let (status, body, _) = post_rebuild(&env, "orders", Some(ADMIN_KEY)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("rebuild_running"))
    );
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query(&mut env.redis())
        .unwrap();

    let (status, body, _) = post_rebuild(&env, "orders", Some(ADMIN_KEY)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "started");
    eventually(
        "the rebuilt version is current",
        Duration::from_secs(60),
        || async { (current(&env) == 2).then_some(()) },
    )
    .await;
    assert_eq!(snapshot(&env, "orders").await, before);
    let logs = processor.log_text();
    assert!(logs.contains("Rebuild finished."), "{logs}");
    assert!(!logs.contains(ADMIN_KEY), "the admin key was logged");

    // No key configured: the endpoint is off.
    let off = TestEnv::on(
        "rb-admin-off",
        &env.brokers,
        &env.redis_url,
        "[processor]\nadmin_keys = []",
    );
    off.create_topics();
    let _off_processor = off.processor();
    let (status, body, _) = post_rebuild(&off, "orders", Some(ADMIN_KEY)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("admin_disabled"))
    );
}
