//! Outbound delivery end to end (`hooklog-processor deliver`) on Tansu and
//! Redis: the seed's agent-to-agent scenario, retries, 410, the DLQ after
//! the schedule, isolation of a slow subscriber, kill -9, the SSRF guard,
//! secret rotation, automatic disabling, moving or re-enabling a
//! subscription, recovering its dead letters, replaying its history, and
//! test events.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hooklog_e2e::receiver::{Hit, Receiver};
use hooklog_e2e::sign::{self, mac, now};
use hooklog_e2e::{
    events, eventually, get_json, kafka, let_killed_member_expire, metric, secret, unique, TestEnv,
    API_KEY,
};
use serde_json::{json, Value};

use crate::ingest::post;

async fn api(
    env: &TestEnv,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", env.delivery_url()))
        .timeout(Duration::from_secs(10));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("api request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// An authorized GET of the subscription API.
async fn get(env: &TestEnv, path: &str) -> (u16, Value) {
    api(env, reqwest::Method::GET, path, Some(API_KEY), None).await
}

/// Subscribes `url` to `event_type`; returns (id, secret).
async fn subscribe(env: &TestEnv, event_type: &str, url: &str) -> (String, String) {
    let (status, body) = api(
        env,
        reqwest::Method::POST,
        "/api/v1/webhooks",
        Some(API_KEY),
        Some(
            json!({"event_type": event_type, "callback_url": url, "description": "e2e"})
                .to_string(),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

/// The FulfillmentAgent: posts a signed order event to ingest; returns its event id.
async fn ship(env: &TestEnv, body: &str) -> String {
    crate::processor::send(env, "fulfillment", "hmac-sha256", body, "").await["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn order(event_id: &str, order_id: &str, event_type: &str) -> String {
    json!({"event_id": event_id, "event_type": event_type, "order_id": order_id,
           "shipping_carrier": "FedEx", "tracking_number": "1Z", "shipped_at": "2025-03-01T12:00:00Z"})
    .to_string()
}

async fn wait_hits(r: &Receiver, n: usize, timeout: Duration) -> Vec<Hit> {
    eventually(&format!("{n} deliveries"), timeout, || async {
        let h = r.hits();
        (h.len() >= n).then_some(h)
    })
    .await
}

/// The seed's Python recipe: `hmac.new(secret.encode(), body, sha256).hexdigest()`.
fn seed_verifies(secret: &str, hit: &Hit) -> bool {
    let expected = hex::encode(mac(secret.as_bytes(), &[&hit.body]));
    hit.header("x-webhook-signature") == Some(expected.as_str())
}

/// Standard Webhooks: any listed `v1,` signature under the secret's key.
fn standard_verifies(secret: &str, hit: &Hit) -> bool {
    let key = B64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let id = hit.header("webhook-id").unwrap_or_default();
    let ts = hit.header("webhook-timestamp").unwrap_or_default();
    let expected = format!(
        "v1,{}",
        B64.encode(mac(
            &key,
            &[id.as_bytes(), b".", ts.as_bytes(), b".", &hit.body]
        ))
    );
    hit.header("webhook-signature")
        .unwrap_or_default()
        .split(' ')
        .any(|s| s == expected)
}

fn dlq_for(env: &TestEnv, event_id: &str, sub: &str) -> Option<kafka::Rec> {
    kafka::read_all(&env.brokers, "hooklog.delivery.dlq")
        .into_iter()
        .find(|r| {
            r.key_str() == event_id && r.header("hooklog-subscription-id").as_deref() == Some(sub)
        })
}

#[tokio::test]
async fn seed_agent_to_agent_order_shipped_is_delivered_signed_and_projected() {
    let env = TestEnv::new("dlv-seed");
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    let deliverer = env.deliverer();
    // The CustomerServiceAgent subscribes to the FulfillmentAgent's order.shipped.
    let agent = Receiver::start(&[200], Duration::ZERO).await;
    let (id, sub_secret) = subscribe(&env, "order.shipped", &agent.url).await;
    assert!(id.starts_with("sub_") && sub_secret.starts_with("whsec_"));

    // The FulfillmentAgent's request carries a trace context: the
    // delivery continues that trace.
    let trace = hooklog_schemas::trace::TraceParent::new_root();
    let mut headers = sign::headers(
        "hmac-sha256",
        secret("fulfillment"),
        events::SEED_ORDER_SHIPPED.as_bytes(),
        now(),
        "",
    );
    headers.push(("traceparent".into(), trace.header_value()));
    let r = post(
        &env,
        "fulfillment",
        &headers,
        events::SEED_ORDER_SHIPPED.as_bytes().to_vec(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    let event_id = r.json["event_id"].as_str().unwrap().to_owned();
    let hits = wait_hits(&agent, 1, Duration::from_secs(60)).await;
    let hit = &hits[0];
    assert_eq!(
        hit.body,
        events::SEED_ORDER_SHIPPED.as_bytes(),
        "identical bytes"
    );
    assert!(
        seed_verifies(&sub_secret, hit),
        "X-Webhook-Signature per the seed recipe"
    );
    assert!(
        standard_verifies(&sub_secret, hit),
        "Standard Webhooks signature"
    );
    assert_eq!(hit.header("webhook-id"), Some(event_id.as_str()));
    assert_eq!(hit.header("x-webhook-event-type"), Some("order.shipped"));
    let delivered_trace =
        hooklog_schemas::trace::TraceParent::parse(hit.header("traceparent").unwrap()).unwrap();
    assert_eq!(
        delivered_trace.trace_id, trace.trace_id,
        "the delivery continues the trace"
    );
    let ts: i64 = hit.header("webhook-timestamp").unwrap().parse().unwrap();
    assert!((ts - now()).abs() < 60);

    // The orders projection shows the shipment.
    let url = format!("{}/v1/projections/orders/ORD-633261", env.processor_url());
    let state = eventually("orders projection", Duration::from_secs(60), || async {
        get_json(&url)
            .await
            .filter(|s| s.to_string().contains("\"shipped\""))
    })
    .await;
    assert!(state.to_string().contains("1ZBPWJXU5C9BPQBMCI"), "{state}");

    // The API: list, read (no secret), delivery log, auth.
    let (s, list) = get(&env, "/api/v1/webhooks").await;
    assert_eq!(s, 200);
    assert!(list["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|w| w["id"] == id.as_str()));
    let (s, one) = get(&env, &format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(
        (s, one["event_type"].as_str(), one["enabled"].as_bool()),
        (200, Some("order.shipped"), Some(true))
    );
    assert!(one.get("secret").is_none() && !one.to_string().contains(&sub_secret));
    let log = eventually("delivery log", Duration::from_secs(10), || async {
        let (_, l) = get(&env, &format!("/api/v1/webhooks/{id}/deliveries")).await;
        (l["deliveries"].as_array().is_some_and(|d| !d.is_empty())).then_some(l)
    })
    .await;
    let d = &log["deliveries"][0];
    assert_eq!(
        (
            d["event_id"].as_str(),
            d["attempt"].as_u64(),
            d["status_code"].as_u64(),
            d["outcome"].as_str()
        ),
        (
            Some(event_id.as_str()),
            Some(1),
            Some(200),
            Some("delivered")
        )
    );
    for key in [None, Some("wrong-key")] {
        let (s, body) = api(&env, reqwest::Method::GET, "/api/v1/webhooks", key, None).await;
        assert_eq!((s, body["error"].as_str()), (401, Some("unauthorized")));
    }
    // An event type nobody subscribed to is not delivered.
    ship(&env, &order(&unique("evt_"), "ORD-X", "order.delivered")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.hits().len(), 1);
    // Neither the subscription secret nor the API key reaches the logs.
    let logs = deliverer.log_text();
    assert!(!logs.contains(&sub_secret) && !logs.contains(API_KEY));
    assert!(logs.contains(&id), "the log names the subscription");
}

#[tokio::test]
async fn retries_then_delivers_once_410_disables_and_a_down_receiver_ends_in_the_dlq() {
    let env = TestEnv::new("dlv-retry");
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    let flaky = Receiver::start(&[500, 500, 200], Duration::ZERO).await;
    let gone = Receiver::start(&[410], Duration::ZERO).await;
    let down = Receiver::start(&[200], Duration::ZERO).await;
    down.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _) = subscribe(&env, "order.*", &flaky.url).await;
    let (gone_id, _) = subscribe(&env, "order.shipped", &gone.url).await;
    let (down_id, _) = subscribe(&env, "order.shipped", &down.url).await;

    let event_id = ship(&env, &order(&unique("evt_"), "ORD-R1", "order.shipped")).await;
    let hits = wait_hits(&flaky, 3, Duration::from_secs(60)).await;
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert!(hits
        .iter()
        .all(|h| h.header("webhook-id") == Some(event_id.as_str())));
    assert!(
        hits[1].at - hits[0].at >= Duration::from_millis(700),
        "retried after the schedule's delay"
    );

    // The 410 receiver was asked once and its subscription is disabled.
    let (_, sub) = get(&env, &format!("/api/v1/webhooks/{gone_id}")).await;
    assert_eq!(sub["enabled"], false, "{sub}");
    assert!(sub["disabled_reason"].as_str().unwrap().contains("410"));

    // The down receiver's attempt is in the DLQ with its reason after the schedule.
    let dead = eventually("delivery DLQ record", Duration::from_secs(60), || async {
        dlq_for(&env, &event_id, &down_id)
    })
    .await;
    assert_eq!(
        dead.header("hooklog-dlq-reason").as_deref(),
        Some("max_attempts")
    );
    assert_eq!(dead.header("hooklog-attempts").as_deref(), Some("3"));
    assert!(
        dead.header("hooklog-dlq-detail")
            .unwrap()
            .contains("connect"),
        "{:?}",
        dead.header("hooklog-dlq-detail")
    );
    assert_eq!(
        dead.value.as_deref(),
        Some(hits[0].body.as_slice()),
        "the DLQ record carries the raw body"
    );

    // Later events: the flaky one is healthy now; the 410 one is never asked again.
    let second = ship(&env, &order(&unique("evt_"), "ORD-R2", "order.shipped")).await;
    let hits = wait_hits(&flaky, 4, Duration::from_secs(30)).await;
    assert_eq!(hits[3].header("webhook-id"), Some(second.as_str()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(flaky.hits().len(), 4, "delivered once each");
    assert_eq!(gone.hits().len(), 1, "no attempts after 410");
    let m = hooklog_e2e::metric(
        &env.delivery_url(),
        "hooklog_delivery_attempts_total",
        &["outcome=\"delivered\""],
    )
    .await;
    assert_eq!(m, 2.0);
}

#[tokio::test]
async fn a_slow_subscriber_does_not_delay_a_healthy_one() {
    let env = TestEnv::on(
        "dlv-slow",
        &hooklog_e2e::shared_stack().brokers,
        &hooklog_e2e::shared_stack().redis_url,
        "[delivery]\nendpoint_concurrency = 2",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    let slow = Receiver::start(&[200], Duration::from_millis(1500)).await;
    let healthy = Receiver::start(&[200], Duration::ZERO).await;
    subscribe(&env, "order.shipped", &slow.url).await;
    subscribe(&env, "order.shipped", &healthy.url).await;
    let n = 12;
    let started = Instant::now();
    let mut sent_at = HashMap::new();
    for i in 0..n {
        let id = ship(
            &env,
            &order(&unique("evt_"), &format!("ORD-S{i}"), "order.shipped"),
        )
        .await;
        sent_at.insert(id, Instant::now());
    }
    let healthy_hits = wait_hits(&healthy, n, Duration::from_secs(60)).await;
    let healthy_done = started.elapsed();
    let slow_hits = wait_hits(&slow, n, Duration::from_secs(90)).await;
    let slow_done = started.elapsed();
    let worst_healthy = healthy_hits
        .iter()
        .map(|h| h.at - sent_at[h.header("webhook-id").unwrap()])
        .max()
        .unwrap();
    println!(
        "slow subscriber: healthy received all {n} in {healthy_done:?} (worst latency {worst_healthy:?}); slow in {slow_done:?}"
    );
    assert_eq!(slow_hits.len(), n);
    // 12 events × 1.5 s at 2 in flight: the last one arrives after ≥ 7.5 s; the
    // healthy one must not wait for it.
    assert!(slow_done >= Duration::from_secs(7), "{slow_done:?}");
    assert!(worst_healthy < Duration::from_secs(4), "{worst_healthy:?}");
    assert!(
        healthy_done * 2 < slow_done,
        "{healthy_done:?} vs {slow_done:?}"
    );
}

/// The attempts in flight are bounded in the bytes of their bodies
/// (`delivery.max_in_flight_bytes`): a body with no room waits, unattempted,
/// and every event is still delivered once.
#[tokio::test]
async fn attempts_in_flight_are_bounded_in_bytes() {
    let env = TestEnv::on(
        "dlv-bytes",
        &hooklog_e2e::shared_stack().brokers,
        &hooklog_e2e::shared_stack().redis_url,
        "[delivery]\nmax_in_flight_bytes = 3000",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    let slow = Receiver::start(&[200], Duration::from_millis(600)).await;
    subscribe(&env, "order.shipped", &slow.url).await;
    let n = 4;
    for i in 0..n {
        // ~2.2 KB: two of them do not fit in 3,000 bytes.
        let mut body: Value = serde_json::from_str(&order(
            &unique("evt_"),
            &format!("ORD-B{i}"),
            "order.shipped",
        ))
        .unwrap();
        body["notes"] = "x".repeat(2_000).into();
        ship(&env, &body.to_string()).await;
    }
    wait_hits(&slow, n, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let hits = slow.hits();
    let ids: HashSet<&str> = hits.iter().filter_map(|h| h.header("webhook-id")).collect();
    assert_eq!((hits.len(), ids.len()), (n, n), "each event delivered once");
    // Each request waited 600 ms for its answer: one at a time, the next
    // arrives at least that much later (without the bound all four would
    // be in flight together).
    let mut at: Vec<Instant> = hits.iter().map(|h| h.at).collect();
    at.sort();
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(550),
            "two bodies in flight at once ({gap:?} apart)"
        );
    }
    let waits = metric(
        &env.delivery_url(),
        "hooklog_delivery_jobs_waiting_for_room_total",
        &[],
    )
    .await;
    assert!(waits >= 1.0, "no job counted as waiting for room: {waits}");
}

#[tokio::test]
async fn kill_9_mid_stream_delivers_every_event_at_least_once_with_stable_ids() {
    let env = TestEnv::new("dlv-kill");
    env.create_topics();
    let _ingest = env.ingest();
    let mut deliverer = env.deliverer();
    let agent = Receiver::start(&[200], Duration::from_millis(50)).await;
    let (id, _) = subscribe(&env, "order.shipped", &agent.url).await;
    let n = 150;
    let mut sent = HashMap::new();
    for i in 0..n {
        let body = order(&unique("evt_"), &format!("ORD-K{i}"), "order.shipped");
        let event_id = ship(&env, &body).await;
        sent.insert(event_id, body);
        if i == 40 {
            deliverer.kill();
        }
    }
    let_killed_member_expire().await;
    // Subscriptions survive the restart (they live in Redis).
    deliverer.start();
    hooklog_e2e::wait_http_ok(
        &format!("{}/readyz", env.delivery_url()),
        Duration::from_secs(60),
    );
    let (s, _) = get(&env, &format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(s, 200);
    let hits = eventually(
        "every event delivered",
        Duration::from_secs(120),
        || async {
            let h = agent.hits();
            let got: HashSet<&str> = h.iter().filter_map(|h| h.header("webhook-id")).collect();
            sent.keys()
                .all(|k| got.contains(k.as_str()))
                .then_some(h.clone())
        },
    )
    .await;
    let mut per_id: HashMap<&str, Vec<&Hit>> = HashMap::new();
    for h in &hits {
        per_id
            .entry(h.header("webhook-id").unwrap())
            .or_default()
            .push(h);
    }
    assert_eq!(per_id.len(), n, "no unknown ids");
    for (event_id, hs) in &per_id {
        for h in hs {
            assert_eq!(
                h.body,
                sent[*event_id].as_bytes(),
                "a duplicate carries the same id and bytes"
            );
        }
    }
    println!("kill -9: {} deliveries for {n} events", hits.len());
}

#[tokio::test]
async fn ssrf_guard_and_api_validation() {
    let stack = hooklog_e2e::shared_stack();
    let env = TestEnv::on(
        "dlv-ssrf",
        &stack.brokers,
        &stack.redis_url,
        "[delivery]\nallow_private_networks = false",
    );
    env.create_topics();
    let _deliverer = env.deliverer();
    let post = |body: String| {
        api(
            &env,
            reqwest::Method::POST,
            "/api/v1/webhooks",
            Some(API_KEY),
            Some(body),
        )
    };
    for url in [
        "http://127.0.0.1:9999/hook",
        "http://localhost:8080/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data",
    ] {
        let (s, body) =
            post(json!({"event_type": "order.shipped", "callback_url": url}).to_string()).await;
        assert_eq!(
            (s, body["error"].as_str(), body["field"].as_str()),
            (422, Some("validation_failed"), Some("callback_url")),
            "{url}: {body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("non-public"),
            "{body}"
        );
    }
    let cases = [
        ("{not json", 400, "invalid_json"),
        ("[1]", 400, "invalid_json"),
        (
            r#"{"callback_url":"https://example.com/x"}"#,
            422,
            "event_type",
        ),
        (
            r#"{"event_type":"order*","callback_url":"https://example.com/x"}"#,
            422,
            "event_type",
        ),
        (r#"{"event_type":"order.shipped"}"#, 422, "callback_url"),
        (
            r#"{"event_type":"order.shipped","callback_url":"ftp://example.com/x"}"#,
            422,
            "callback_url",
        ),
        (
            r#"{"event_type":"order.shipped","callback_url":"https://example.com/x","colour":"red"}"#,
            422,
            "colour",
        ),
        (
            r#"{"event_type":5,"callback_url":"https://example.com/x"}"#,
            422,
            "event_type",
        ),
    ];
    for (body, status, what) in cases {
        let (s, j) = post(body.into()).await;
        assert_eq!(s, status, "{body}: {j}");
        assert!(
            j["error"].as_str() == Some(what) || j["field"].as_str() == Some(what),
            "{body}: {j}"
        );
    }
    let (s, _) = api(
        &env,
        reqwest::Method::DELETE,
        "/api/v1/webhooks/sub_nope",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_during_the_grace_period() {
    let env = TestEnv::new("dlv-rotate");
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    let agent = Receiver::start(&[200], Duration::ZERO).await;
    let (id, old) = subscribe(&env, "order.shipped", &agent.url).await;
    let (s, rotated) = api(
        &env,
        reqwest::Method::POST,
        &format!("/api/v1/webhooks/{id}/rotate-secret"),
        Some(API_KEY),
        Some(r#"{"grace_period_secs": 600}"#.into()),
    )
    .await;
    assert_eq!(s, 200, "{rotated}");
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    ship(&env, &order(&unique("evt_"), "ORD-ROT1", "order.shipped")).await;
    let hit = wait_hits(&agent, 1, Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(
        hit.header("webhook-signature").unwrap().split(' ').count(),
        2
    );
    assert!(
        standard_verifies(&old, &hit),
        "a receiver holding the old secret verifies"
    );
    assert!(
        standard_verifies(&new, &hit),
        "a receiver holding the new secret verifies"
    );
    assert!(
        seed_verifies(&new, &hit),
        "X-Webhook-Signature uses the current secret"
    );

    // A rotation without grace: only the newest secret signs.
    let (_, again) = api(
        &env,
        reqwest::Method::POST,
        &format!("/api/v1/webhooks/{id}/rotate-secret"),
        Some(API_KEY),
        Some(r#"{"grace_period_secs": 0}"#.into()),
    )
    .await;
    let newest = again["secret"].as_str().unwrap().to_owned();
    ship(&env, &order(&unique("evt_"), "ORD-ROT2", "order.shipped")).await;
    let hit = wait_hits(&agent, 2, Duration::from_secs(60))
        .await
        .remove(1);
    assert!(standard_verifies(&newest, &hit) && seed_verifies(&newest, &hit));
    assert!(!standard_verifies(&new, &hit) && !standard_verifies(&old, &hit));
    // Delete: no more deliveries.
    let (s, _) = api(
        &env,
        reqwest::Method::DELETE,
        &format!("/api/v1/webhooks/{id}"),
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(s, 204);
    ship(&env, &order(&unique("evt_"), "ORD-ROT3", "order.shipped")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(agent.hits().len(), 2);
}

#[tokio::test]
async fn an_endpoint_failing_for_long_is_disabled_and_reported() {
    let stack = hooklog_e2e::shared_stack();
    let env = TestEnv::on(
        "dlv-disable",
        &stack.brokers,
        &stack.redis_url,
        "[delivery]\nretry_schedule_secs = [1, 1, 1, 1, 1, 1]\ndisable_after_failing_secs = 2",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let deliverer = env.deliverer();
    let failing = Receiver::start(&[503], Duration::ZERO).await;
    let (id, _) = subscribe(&env, "order.shipped", &failing.url).await;
    let event_id = ship(&env, &order(&unique("evt_"), "ORD-D1", "order.shipped")).await;
    let sub = eventually("auto-disable", Duration::from_secs(60), || async {
        let (_, s) = get(&env, &format!("/api/v1/webhooks/{id}")).await;
        (s["enabled"] == false).then_some(s)
    })
    .await;
    assert!(
        sub["disabled_reason"].as_str().unwrap().contains("failing"),
        "{sub}"
    );
    let dead = eventually("DLQ record", Duration::from_secs(30), || async {
        dlq_for(&env, &event_id, &id)
    })
    .await;
    assert_eq!(
        dead.header("hooklog-dlq-reason").as_deref(),
        Some("subscription_disabled")
    );
    let attempts = failing.hits().len();
    assert!((2..=5).contains(&attempts), "{attempts}");
    let disabled = hooklog_e2e::metric(
        &env.delivery_url(),
        "hooklog_delivery_subscriptions_disabled_total",
        &["failing"],
    )
    .await;
    assert_eq!(disabled, 1.0);
    assert!(deliverer.log_text().contains("disabled automatically"));
}

/// With `redis.wait_replicas = 1` the fan-out commits an event's offset only
/// once a replica has its jobs: with the replica down it pauses (the
/// deliverer's `/readyz` body says so) while the subscription API answers
/// at once (the fan-out waits on a connection of its own); with the
/// replica back it carries on, and each event is delivered once.
#[tokio::test]
async fn the_fan_out_waits_for_a_replica_when_asked() {
    let stack = hooklog_e2e::shared_stack();
    let (_primary, url) = hooklog_e2e::private_redis("dlv-primary", &[]);
    let mut replica = hooklog_e2e::private_replica("dlv-replica", &url);
    let env = TestEnv::on("dlv-wait", &stack.brokers, &url, "");
    env.create_topics();
    let _ingest = env.ingest();
    let mut deliverer = env.deliverer_service();
    deliverer.env("HOOKLOG_REDIS__WAIT_REPLICAS", "1");
    deliverer.env("HOOKLOG_REDIS__WAIT_TIMEOUT_MS", "3000");
    deliverer.start();
    let ready = format!("{}/readyz", env.delivery_url());
    hooklog_e2e::wait_http_ok(&ready, Duration::from_secs(60));
    let agent = Receiver::start(&[200], Duration::ZERO).await;
    subscribe(&env, "order.shipped", &agent.url).await;
    let first = ship(&env, &order(&unique("evt_"), "ORD-W1", "order.shipped")).await;
    wait_hits(&agent, 1, Duration::from_secs(60)).await;

    replica.kill();
    let second = ship(&env, &order(&unique("evt_"), "ORD-W2", "order.shipped")).await;
    let paused = |want: bool| {
        let ready = ready.clone();
        async move {
            get_json(&ready)
                .await
                .filter(|b| b["paused"] == want)
                .map(|_| ())
        }
    };
    eventually("the fan-out pauses", Duration::from_secs(30), || {
        paused(true)
    })
    .await;
    assert!(
        deliverer.log_text().contains("0 of 1 within 3000 ms"),
        "{}",
        deliverer.log_text()
    );
    hooklog_e2e::reads_answer_at_once("the subscription API", || async {
        get(&env, "/api/v1/webhooks").await.0 == 200
    })
    .await;

    replica.start();
    eventually("the fan-out resumes", Duration::from_secs(60), || {
        paused(false)
    })
    .await;
    wait_hits(&agent, 2, Duration::from_secs(60)).await;
    // Room for a duplicate to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got: Vec<String> = agent
        .hits()
        .iter()
        .filter_map(|h| h.header("webhook-id").map(str::to_owned))
        .collect();
    got.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(got, want);
}

/// PATCH: a subscription disabled by a 410 is moved to a new endpoint and
/// enabled again with its id and secret; a manual disable stops it.
#[tokio::test]
async fn patch_moves_and_re_enables_a_disabled_subscription() {
    let env = TestEnv::new("dlv-patch");
    env.create_topics();
    let _ingest = env.ingest();
    let deliverer = env.deliverer();
    let gone = Receiver::start(&[410], Duration::ZERO).await;
    let moved = Receiver::start(&[200], Duration::ZERO).await;
    let (id, sub_secret) = subscribe(&env, "order.shipped", &gone.url).await;
    let path = format!("/api/v1/webhooks/{id}");
    let patch = |body: Value, key: Option<&'static str>| {
        let (env, path) = (&env, path.clone());
        async move {
            api(
                env,
                reqwest::Method::PATCH,
                &path,
                key,
                Some(body.to_string()),
            )
            .await
        }
    };

    ship(&env, &order(&unique("evt_"), "ORD-P1", "order.shipped")).await;
    wait_hits(&gone, 1, Duration::from_secs(30)).await;
    let sub = eventually("disabled by the 410", Duration::from_secs(30), || async {
        let (_, sub) = get(&env, &path).await;
        (sub["enabled"] == false).then_some(sub)
    })
    .await;
    assert!(sub["disabled_reason"].as_str().unwrap().contains("410"));

    // Refused changes name what is wrong and change nothing.
    for (body, field) in [
        (json!({}), "body"),
        (json!({"secret": "x"}), "secret"),
        (json!({"enabled": "yes"}), "enabled"),
        (json!({"event_type": "order*"}), "event_type"),
        (
            json!({"callback_url": "ftp://example.com/x", "enabled": true}),
            "callback_url",
        ),
    ] {
        let (status, answer) = patch(body.clone(), Some(API_KEY)).await;
        assert_eq!(
            (status, answer["field"].as_str()),
            (422, Some(field)),
            "{body}"
        );
    }
    let (status, _) = patch(json!({"enabled": true}), None).await;
    assert_eq!(status, 401);
    let (status, answer) = api(
        &env,
        reqwest::Method::PATCH,
        "/api/v1/webhooks/sub_nope",
        Some(API_KEY),
        Some(json!({"enabled": true}).to_string()),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_webhook"))
    );
    assert_eq!(get(&env, &path).await.1["enabled"], false);

    // Moved and enabled again: the same id and secret, the events from now on.
    let (status, sub) = patch(
        json!({"callback_url": moved.url, "enabled": true, "description": "moved"}),
        Some(API_KEY),
    )
    .await;
    assert_eq!(status, 200, "{sub}");
    assert_eq!(
        (
            &sub["id"],
            &sub["enabled"],
            &sub["callback_url"],
            &sub["description"]
        ),
        (&json!(id), &json!(true), &json!(moved.url), &json!("moved"))
    );
    assert!(sub.get("disabled_reason").is_none(), "{sub}");
    assert!(
        sub.get("secret").is_none(),
        "a PATCH never shows the secret"
    );
    let second = ship(&env, &order(&unique("evt_"), "ORD-P2", "order.shipped")).await;
    let hits = wait_hits(&moved, 1, Duration::from_secs(30)).await;
    assert_eq!(hits[0].header("webhook-id"), Some(second.as_str()));
    assert!(
        seed_verifies(&sub_secret, &hits[0]),
        "signed with the same secret"
    );
    assert_eq!(gone.hits().len(), 1, "the old endpoint is not asked again");

    // Disabled by hand: nothing more is delivered.
    let (status, sub) = patch(json!({"enabled": false}), Some(API_KEY)).await;
    assert_eq!((status, &sub["enabled"]), (200, &json!(false)), "{sub}");
    assert_eq!(sub["disabled_reason"], "manual");
    ship(&env, &order(&unique("evt_"), "ORD-P3", "order.shipped")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        moved.hits().len(),
        1,
        "a disabled subscription got an event"
    );
    assert!(deliverer.log_text().contains("Subscription updated."));
}

/// Recovery: dead letters of a subscription go back to its queue once its
/// endpoint is fixed, each delivered with the same `webhook-id`; those whose
/// event expired are counted; a disabled subscription is refused.
#[tokio::test]
async fn recover_puts_dead_letters_back_once_the_endpoint_is_fixed() {
    let env = TestEnv::new("dlv-recover");
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    // 400 is not retried: each event is dead-lettered at its first attempt.
    let agent = Receiver::start(&[400, 400, 400, 200], Duration::ZERO).await;
    let (id, sub_secret) = subscribe(&env, "order.shipped", &agent.url).await;
    let path = format!("/api/v1/webhooks/{id}/recover");
    let recover = |body: Option<Value>, key: Option<&'static str>| {
        let (env, path) = (&env, path.clone());
        async move {
            let body = body.map(|b| b.to_string());
            api(env, reqwest::Method::POST, &path, key, body).await
        }
    };
    let mut dead = Vec::new();
    for n in 1..=3 {
        dead.push(
            ship(
                &env,
                &order(&unique("evt_"), &format!("ORD-D{n}"), "order.shipped"),
            )
            .await,
        );
    }
    eventually("three dead letters", Duration::from_secs(30), || async {
        let failed = metric(
            &env.delivery_url(),
            "hooklog_delivery_attempts_total",
            &["outcome=\"failed\""],
        )
        .await;
        (failed >= 3.0).then_some(())
    })
    .await;

    for (body, field) in [
        (json!({"since": "yesterday"}), "since"),
        (json!({"until": "2026-01-01T00:00:00Z"}), "until"),
    ] {
        let (status, answer) = recover(Some(body.clone()), Some(API_KEY)).await;
        assert_eq!(
            (status, answer["field"].as_str()),
            (422, Some(field)),
            "{body}"
        );
    }
    assert_eq!(recover(None, None).await.0, 401);
    let (status, answer) = api(
        &env,
        reqwest::Method::POST,
        "/api/v1/webhooks/sub_nope/recover",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_webhook"))
    );
    let (status, answer) = recover(
        Some(json!({"since": "2999-01-01T00:00:00Z"})),
        Some(API_KEY),
    )
    .await;
    assert_eq!((status, &answer["requeued"]), (200, &json!(0)), "{answer}");
    assert_eq!(agent.hits().len(), 3, "nothing was attempted again");

    // One event's body is gone (past delivery.retention_secs): counted, not sent.
    let expired = dead.remove(0);
    let _: () = redis::cmd("DEL")
        .arg(format!("{}dlv:evt:fulfillment/{expired}", env.prefix))
        .query(&mut env.redis())
        .unwrap();
    let (status, answer) = recover(None, Some(API_KEY)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["requeued"], &answer["expired"]),
        (&json!(2), &json!(1))
    );
    let hits = wait_hits(&agent, 5, Duration::from_secs(30)).await;
    let mut redelivered: Vec<&str> = hits[3..]
        .iter()
        .map(|h| {
            assert_eq!(h.status, 200);
            assert!(seed_verifies(&sub_secret, h));
            h.header("webhook-id").unwrap()
        })
        .collect();
    redelivered.sort_unstable();
    dead.sort_unstable();
    assert_eq!(
        redelivered, dead,
        "each dead letter delivered again, same id"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.hits().len(), 5, "delivered once each");
    let (_, answer) = recover(None, Some(API_KEY)).await;
    assert_eq!(
        (&answer["requeued"], &answer["expired"]),
        (&json!(0), &json!(0))
    );
    let recovered = metric(
        &env.delivery_url(),
        "hooklog_delivery_jobs_recovered_total",
        &[],
    )
    .await;
    assert_eq!(recovered, 2.0);

    // A disabled subscription is enabled first, or its jobs would die again.
    let (status, _) = api(
        &env,
        reqwest::Method::PATCH,
        &format!("/api/v1/webhooks/{id}"),
        Some(API_KEY),
        Some(json!({"enabled": false}).to_string()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = recover(None, Some(API_KEY)).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("webhook_disabled"))
    );
}

/// Polls a replay's status until it is no longer running.
async fn replay_finished(env: &TestEnv, path: &str) -> Value {
    eventually("the replay to finish", Duration::from_secs(60), || async {
        let (_, s) = api(env, reqwest::Method::GET, path, Some(API_KEY), None).await;
        (s["state"] != "running").then_some(s)
    })
    .await
}

/// Replay: events received before the subscription existed are queued on
/// request, within the window asked for and once each; what it already got
/// is not sent again.
#[tokio::test]
async fn replay_queues_what_a_subscription_never_got() {
    let env = TestEnv::new("dlv-replay");
    env.create_topics();
    let _ingest = env.ingest();
    let deliverer = env.deliverer();
    let before_window = ship(&env, &order(&unique("evt_"), "ORD-R0", "order.shipped")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let since = hooklog_processor::delivery::subscription::rfc3339(now_ms);
    let mut missed = Vec::new();
    for n in 1..=2 {
        missed.push(
            ship(
                &env,
                &order(&unique("evt_"), &format!("ORD-R{n}"), "order.shipped"),
            )
            .await,
        );
    }
    ship(&env, &order(&unique("evt_"), "ORD-R1", "order.delivered")).await;

    let agent = Receiver::start(&[200], Duration::ZERO).await;
    let (id, _) = subscribe(&env, "order.shipped", &agent.url).await;
    let live = ship(&env, &order(&unique("evt_"), "ORD-R3", "order.shipped")).await;
    wait_hits(&agent, 1, Duration::from_secs(30)).await;
    let path = format!("/api/v1/webhooks/{id}/replay");
    let replay = |body: Value| {
        let (env, path) = (&env, path.clone());
        async move {
            api(
                env,
                reqwest::Method::POST,
                &path,
                Some(API_KEY),
                Some(body.to_string()),
            )
            .await
        }
    };

    for (body, field) in [
        (json!({}), "since"),
        (json!({"since": "last week"}), "since"),
        (
            json!({"since": since, "until": "2020-01-01T00:00:00Z"}),
            "since",
        ),
        (json!({"since": since, "limit": 5}), "limit"),
    ] {
        let (status, answer) = replay(body.clone()).await;
        assert_eq!(
            (status, answer["field"].as_str()),
            (422, Some(field)),
            "{body}"
        );
    }
    let (status, answer) = api(&env, reqwest::Method::GET, &path, Some(API_KEY), None).await;
    assert_eq!((status, answer["error"].as_str()), (404, Some("no_replay")));
    // One replay of a subscription at a time, across replicas.
    let lock = format!("{}dlv:replay-lock:{id}", env.prefix);
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("elsewhere")
        .query(&mut env.redis())
        .unwrap();
    let (status, answer) = replay(json!({"since": since})).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("replay_running"))
    );
    let _: () = redis::cmd("DEL")
        .arg(&lock)
        .query(&mut env.redis())
        .unwrap();

    let (status, answer) = replay(json!({"since": since})).await;
    assert_eq!(
        (status, &answer["state"]),
        (202, &json!("running")),
        "{answer}"
    );
    let status = replay_finished(&env, &path).await;
    assert_eq!(
        (&status["state"], &status["queued"]),
        (&json!("done"), &json!(2)),
        "{status}"
    );
    assert!(status["scanned"].as_u64().unwrap() >= 5, "{status}");
    let hits = wait_hits(&agent, 3, Duration::from_secs(30)).await;
    let mut got: Vec<&str> = hits
        .iter()
        .map(|h| h.header("webhook-id").unwrap())
        .collect();
    got.sort_unstable();
    let mut expected: Vec<&str> = missed.iter().map(String::as_str).collect();
    expected.push(&live);
    expected.sort_unstable();
    assert_eq!(
        got, expected,
        "the missed events and the live one, once each"
    );
    assert!(!got.contains(&before_window.as_str()));

    // Again: everything in the window has its job already.
    replay(json!({"since": since})).await;
    let status = replay_finished(&env, &path).await;
    assert_eq!(
        (&status["state"], &status["queued"]),
        (&json!("done"), &json!(0)),
        "{status}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(agent.hits().len(), 3, "nothing delivered twice");
    let replayed = metric(
        &env.delivery_url(),
        "hooklog_delivery_jobs_replayed_total",
        &[],
    )
    .await;
    assert_eq!(replayed, 2.0);
    assert!(deliverer.log_text().contains("Replay finished."));

    // The whole history: only the event from before the first window is new.
    replay(json!({"since": "1970-01-01T00:00:00Z"})).await;
    let status = replay_finished(&env, &path).await;
    assert_eq!(
        (&status["state"], &status["queued"]),
        (&json!("done"), &json!(1)),
        "{status}"
    );
    let hits = wait_hits(&agent, 4, Duration::from_secs(30)).await;
    assert_eq!(hits[3].header("webhook-id"), Some(before_window.as_str()));

    // A replay left marked running by a replica that died (its lock gone).
    let _: () = redis::cmd("HSET")
        .arg(format!("{}dlv:replay:{id}", env.prefix))
        .arg("state")
        .arg("running")
        .query(&mut env.redis())
        .unwrap();
    let (_, status) = api(&env, reqwest::Method::GET, &path, Some(API_KEY), None).await;
    assert_eq!(status["state"], "interrupted", "{status}");
}

/// A test event reaches the receiver signed like a delivery, reports what
/// the receiver answered, and leaves nothing queued or logged.
#[tokio::test]
async fn a_test_event_reports_the_receivers_answer_and_queues_nothing() {
    let env = TestEnv::new("dlv-test");
    env.create_topics();
    let _deliverer = env.deliverer();
    let agent = Receiver::start(&[401, 200], Duration::ZERO).await;
    let (id, sub_secret) = subscribe(&env, "order.shipped", &agent.url).await;
    let path = format!("/api/v1/webhooks/{id}/test");
    let send_test = || api(&env, reqwest::Method::POST, &path, Some(API_KEY), None);

    let (status, first) = send_test().await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(
        (&first["delivered"], &first["status_code"]),
        (&json!(false), &json!(401))
    );
    let (_, second) = send_test().await;
    assert_eq!(
        (&second["delivered"], &second["status_code"]),
        (&json!(true), &json!(200))
    );
    let hits = agent.hits();
    assert_eq!(hits.len(), 2);
    let hit = &hits[1];
    assert_eq!(hit.header("webhook-id"), second["event_id"].as_str());
    assert!(hit.header("webhook-id").unwrap().starts_with("test_"));
    assert_eq!(hit.header("x-webhook-event-type"), Some("hooklog.test"));
    assert!(seed_verifies(&sub_secret, hit) && standard_verifies(&sub_secret, hit));
    let body: Value = serde_json::from_slice(&hit.body).unwrap();
    assert_eq!(body["subscription_id"], json!(id));

    let down = Receiver::start(&[200], Duration::ZERO).await;
    let (down_id, _) = subscribe(&env, "order.shipped", &down.url).await;
    down.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, answer) = api(
        &env,
        reqwest::Method::POST,
        &format!("/api/v1/webhooks/{down_id}/test"),
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(
        (&answer["delivered"], &answer["error"]),
        (&json!(false), &json!("connect"))
    );
    let (status, _) = api(&env, reqwest::Method::POST, &path, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = api(
        &env,
        reqwest::Method::POST,
        "/api/v1/webhooks/sub_nope/test",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Nothing was queued, retried or logged.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(agent.hits().len(), 2);
    let (_, log) = get(&env, &format!("/api/v1/webhooks/{id}/deliveries")).await;
    assert_eq!(
        (&log["pending"], &log["deliveries"]),
        (&json!(0), &json!([])),
        "{log}"
    );
}

/// A subscription can name the source whose events it wants: the same
/// event type from another source is not delivered to it.
#[tokio::test]
async fn a_source_filter_keeps_other_sources_events_out() {
    let env = TestEnv::new("dlv-source");
    env.create_topics();
    let _ingest = env.ingest();
    let _deliverer = env.deliverer();
    let fulfillment = Receiver::start(&[200], Duration::ZERO).await;
    let accounts = Receiver::start(&[200], Duration::ZERO).await;
    let create = |body: Value| {
        let env = &env;
        async move {
            api(
                env,
                reqwest::Method::POST,
                "/api/v1/webhooks",
                Some(API_KEY),
                Some(body.to_string()),
            )
            .await
        }
    };
    let (status, answer) = create(
        json!({"event_type": "order.shipped", "source": "nope", "callback_url": fulfillment.url}),
    )
    .await;
    assert_eq!(
        (status, answer["field"].as_str()),
        (422, Some("source")),
        "{answer}"
    );
    assert!(
        answer["message"].as_str().unwrap().contains("fulfillment"),
        "{answer}"
    );
    let (status, from_fulfillment) = create(json!({"event_type": "order.shipped", "source": "fulfillment", "callback_url": fulfillment.url})).await;
    assert_eq!(status, 201, "{from_fulfillment}");
    assert_eq!(from_fulfillment["source"], "fulfillment");
    let (status, _) = create(
        json!({"event_type": "order.shipped", "source": "accounts", "callback_url": accounts.url}),
    )
    .await;
    assert_eq!(status, 201);

    let shipped = ship(&env, &order(&unique("evt_"), "ORD-S1", "order.shipped")).await;
    let hits = wait_hits(&fulfillment, 1, Duration::from_secs(30)).await;
    assert_eq!(hits[0].header("webhook-id"), Some(shipped.as_str()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        accounts.hits().is_empty(),
        "another source's subscriber got the event"
    );

    // Cleared with PATCH: any source again.
    let path = format!(
        "/api/v1/webhooks/{}",
        from_fulfillment["id"].as_str().unwrap()
    );
    let (status, sub) = api(
        &env,
        reqwest::Method::PATCH,
        &path,
        Some(API_KEY),
        Some(json!({"source": ""}).to_string()),
    )
    .await;
    assert_eq!((status, &sub["source"]), (200, &Value::Null), "{sub}");
}
