//! Observability end to end: one trace from the HTTP request through Kafka
//! to the projection update (exported over OTLP to an in-process receiver),
//! replays linked to the original trace, and exact metric values after a
//! known sequence of requests.

use std::time::Duration;

use hooklog_e2e::otlp::{Collector, Span};
use hooklog_e2e::sign::{self, now};
use hooklog_e2e::{eventually, get_json, kafka, metric, secret, unique, wait_http_ok, TestEnv};
use hooklog_schemas::trace::TraceParent;
use serde_json::json;

use crate::ingest::post;

async fn spans_of(collector: &Collector, trace_id: &str, want: &[(&str, &str)]) -> Vec<Span> {
    eventually(
        &format!("spans {want:?} of trace {trace_id}"),
        Duration::from_secs(60),
        || async {
            let spans: Vec<Span> = collector
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            want.iter()
                .all(|(svc, name)| spans.iter().any(|s| s.service == *svc && s.name == *name))
                .then_some(spans)
        },
    )
    .await
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} span"))
}

#[tokio::test]
async fn one_trace_from_http_request_through_kafka_to_the_projection() {
    let env = TestEnv::new("obs-trace");
    env.create_topics();
    let collector = Collector::start();
    let otel = collector.env();
    let mut ingest = env.ingest_service();
    let mut processor = env.processor_service();
    for (k, v) in &otel {
        ingest.env(k, v);
        processor.env(k, v);
    }
    ingest.start();
    processor.start();
    wait_http_ok(
        &format!("{}/readyz", env.ingest_url()),
        Duration::from_secs(30),
    );
    wait_http_ok(
        &format!("{}/readyz", env.processor_url()),
        Duration::from_secs(30),
    );

    // The provider's request carries a traceparent: ingest continues it.
    let caller = TraceParent::new_root();
    let order_id = unique("ORD-T");
    let body =
        json!({"event_id": unique("evt_"), "event_type": "order.shipped", "order_id": order_id,
        "shipping_carrier": "UPS", "tracking_number": "1Z", "shipped_at": "2025-03-01T12:00:00Z"})
        .to_string();
    let mut headers = sign::headers(
        "hmac-sha256",
        secret("fulfillment"),
        body.as_bytes(),
        now(),
        "",
    );
    headers.push(("traceparent".into(), caller.header_value()));
    let r = post(&env, "fulfillment", &headers, body.into_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let event_id = r.json["event_id"].as_str().unwrap().to_owned();

    let spans = spans_of(
        &collector,
        &caller.trace_id,
        &[
            ("hooklog-ingest", "webhook"),
            ("hooklog-processor", "hooklog.consume"),
            ("hooklog-processor", "hooklog.apply"),
            ("hooklog-processor", "hooklog.changelog"),
        ],
    )
    .await;
    let webhook = one(&spans, "webhook");
    assert_eq!(
        webhook.parent_span_id, caller.span_id,
        "ingest continues the caller's span"
    );
    let consume = one(&spans, "hooklog.consume");
    assert_eq!(
        consume.parent_span_id, webhook.span_id,
        "the processor continues ingest's span"
    );
    assert_eq!(one(&spans, "hooklog.apply").parent_span_id, consume.span_id);
    let changelog = one(&spans, "hooklog.changelog");
    assert_eq!(changelog.parent_span_id, consume.span_id);

    // The raw record's header is ingest's span; the changelog record's is
    // the changelog span: one trace id from the request to the state.
    let raw = kafka::read_all(&env.brokers, &env.topic("fulfillment"))
        .into_iter()
        .find(|r| r.key_str() == event_id)
        .expect("raw record");
    let raw_tp = TraceParent::parse(&raw.header("traceparent").unwrap()).unwrap();
    assert_eq!(
        (raw_tp.trace_id.as_str(), raw_tp.span_id.as_str()),
        (caller.trace_id.as_str(), webhook.span_id.as_str())
    );
    let state_tp = eventually("changelog record", Duration::from_secs(30), || async {
        kafka::read_all(&env.brokers, "hooklog.state.orders")
            .into_iter()
            .rev()
            .find(|r| r.key_str() == order_id)
            .and_then(|r| TraceParent::parse(&r.header("traceparent")?))
    })
    .await;
    assert_eq!(state_tp.trace_id, caller.trace_id);
    assert!(spans
        .iter()
        .any(|s| s.span_id == state_tp.span_id && s.name == "hooklog.changelog"));
    let state = get_json(&format!(
        "{}/v1/projections/orders/{order_id}",
        env.processor_url()
    ))
    .await;
    assert!(state.is_some_and(|s| s.to_string().contains("UPS")));

    // Without a traceparent ingest starts a trace, and the processor joins it.
    let body = json!({"event_id": unique("evt_"), "event_type": "order.shipped", "order_id": unique("ORD-T2"),
        "shipping_carrier": "DHL", "tracking_number": "1Z", "shipped_at": "2025-03-01T12:00:00Z"})
    .to_string();
    let receipt = crate::processor::send(&env, "fulfillment", "hmac-sha256", &body, "").await;
    let second_id = receipt["event_id"].as_str().unwrap().to_owned();
    let raw = eventually("second raw record", Duration::from_secs(30), || async {
        kafka::read_all(&env.brokers, &env.topic("fulfillment"))
            .into_iter()
            .find(|r| r.key_str() == second_id)
    })
    .await;
    let new_trace = TraceParent::parse(&raw.header("traceparent").unwrap())
        .unwrap()
        .trace_id;
    assert_ne!(new_trace, caller.trace_id);
    let spans = spans_of(
        &collector,
        &new_trace,
        &[
            ("hooklog-ingest", "webhook"),
            ("hooklog-processor", "hooklog.apply"),
        ],
    )
    .await;
    assert_eq!(one(&spans, "webhook").parent_span_id, "", "a new root");

    // A rebuild replays into new traces linked to the originals.
    let (ok, out) = env.processor_cmd_env(
        &["rebuild", "--projection", "orders", "--grace-secs", "0"],
        &otel,
    );
    assert!(ok, "{out}");
    let replay = eventually(
        "replay span linked to the original trace",
        Duration::from_secs(60),
        || async {
            collector
                .spans()
                .into_iter()
                .find(|s| s.name == "hooklog.replay" && s.link_trace_ids.contains(&caller.trace_id))
        },
    )
    .await;
    assert_ne!(
        replay.trace_id, caller.trace_id,
        "a replay does not extend the old trace"
    );
    assert_eq!(replay.parent_span_id, "");
    drop((ingest, processor));
}

#[tokio::test]
async fn metrics_count_a_known_sequence_exactly() {
    let env = TestEnv::new("obs-metrics");
    env.create_topics();
    let _ingest = env.ingest();
    let _processor = env.processor();
    let order = |id: &str| {
        json!({"event_id": id, "event_type": "order.shipped", "order_id": unique("ORD-M"),
               "shipping_carrier": "UPS", "tracking_number": "1Z", "shipped_at": "2025-03-01T12:00:00Z"})
        .to_string()
    };
    // 3 accepted (one sent twice: 4 requests), 2 bad signatures, 1 missing header, 1 unknown type.
    let ids: Vec<String> = (0..3).map(|_| unique("evt_")).collect();
    let mut bodies: Vec<String> = ids.iter().map(|id| order(id)).collect();
    bodies.push(bodies[0].clone());
    for b in &bodies {
        let h = sign::headers(
            "hmac-sha256",
            secret("fulfillment"),
            b.as_bytes(),
            now(),
            "",
        );
        assert_eq!(
            post(&env, "fulfillment", &h, b.clone().into_bytes())
                .await
                .status,
            200
        );
    }
    let other = json!({"event_id": unique("evt_"), "event_type": "order.lost"}).to_string();
    let h = sign::headers(
        "hmac-sha256",
        secret("fulfillment"),
        other.as_bytes(),
        now(),
        "",
    );
    assert_eq!(
        post(&env, "fulfillment", &h, other.clone().into_bytes())
            .await
            .status,
        200
    );
    for _ in 0..2 {
        let h = sign::headers("hmac-sha256", "wrong-secret", other.as_bytes(), now(), "");
        assert_eq!(
            post(&env, "fulfillment", &h, other.clone().into_bytes())
                .await
                .status,
            403
        );
    }
    assert_eq!(
        post(&env, "fulfillment", &[], other.into_bytes())
            .await
            .status,
        400
    );

    let ingest = env.ingest_url();
    let m = |name: &'static str, labels: &'static [&'static str]| metric(&ingest, name, labels);
    assert_eq!(
        m(
            "hooklog_ingest_requests_total",
            &["source=\"fulfillment\"", "status=\"200\""]
        )
        .await,
        5.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_requests_total",
            &["source=\"fulfillment\"", "status=\"403\""]
        )
        .await,
        2.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_requests_total",
            &["source=\"fulfillment\"", "status=\"400\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_verification_failures_total",
            &["source=\"fulfillment\"", "reason=\"bad_signature\""]
        )
        .await,
        2.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_verification_failures_total",
            &["source=\"fulfillment\"", "reason=\"missing_header\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_verifications_total",
            &["source=\"fulfillment\"", "key_id=\"0\""]
        )
        .await,
        5.0
    );
    assert_eq!(
        m(
            "hooklog_ingest_publish_duration_seconds_count",
            &["source=\"fulfillment\""]
        )
        .await,
        5.0
    );
    assert_eq!(m("hooklog_ingest_in_flight_requests", &[]).await, 0.0);

    let processor = env.processor_url();
    // Consumed is counted when a batch arrives, applied/duplicate once it is
    // applied: wait for both, so the exact checks below see a settled count.
    eventually(
        "processor consumed and applied all 5 records",
        Duration::from_secs(60),
        || async {
            let orders = &["projection=\"orders\""];
            let consumed =
                metric(&processor, "hooklog_processor_consumed_records_total", &[]).await;
            let applied =
                metric(&processor, "hooklog_processor_applied_events_total", orders).await;
            let duplicates = metric(
                &processor,
                "hooklog_processor_duplicate_events_total",
                orders,
            )
            .await;
            (consumed == 5.0 && applied + duplicates >= 4.0).then_some(())
        },
    )
    .await;
    let p = |name: &'static str, labels: &'static [&'static str]| metric(&processor, name, labels);
    assert_eq!(
        p(
            "hooklog_processor_applied_events_total",
            &["projection=\"orders\""]
        )
        .await,
        3.0
    );
    assert_eq!(
        p(
            "hooklog_processor_duplicate_events_total",
            &["projection=\"orders\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        p("hooklog_processor_unmatched_events_total", &[]).await,
        1.0
    );
    assert_eq!(p("hooklog_processor_dlq_records_total", &[]).await, 0.0);
    assert_eq!(p("hooklog_processor_paused", &[]).await, 0.0);
    // Labels are bounded: no event id ever appears in /metrics.
    for url in [&ingest, &processor] {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(ids.iter().all(|id| !text.contains(id.as_str())));
    }
}

/// The values of signature headers (not ids or timestamps, which are logged).
fn signature_values(headers: Vec<(String, String)>) -> Vec<String> {
    headers
        .into_iter()
        .filter(|(k, _)| {
            let k = k.to_lowercase();
            k.contains("sig") || k.contains("hmac")
        })
        .map(|(_, v)| v)
        .collect()
}

/// Every log line of a service, parsed; panics on a line that is not JSON.
fn json_lines(log: &str, who: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: not a JSON log line ({e}): {l}"))
        })
        .collect()
}

#[tokio::test]
async fn logs_are_json_with_their_fields_and_never_hold_secrets_signatures_or_bodies() {
    use crate::ingest::signed;
    use hooklog_e2e::SECRETS;
    let env = TestEnv::new("obs-logs");
    env.create_topics();
    let ingest = env.ingest();
    let processor = env.processor();
    let mut signatures: Vec<String> = Vec::new();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for (source, scheme, _) in SECRETS {
        let (headers, body, _) = signed(source, &unique("evt-log-"));
        assert_eq!(
            post(&env, source, &headers, body.clone()).await.status,
            200,
            "{source}"
        );
        let mut tampered = body.clone();
        tampered.push(b'\n');
        assert_eq!(post(&env, source, &headers, tampered).await.status, 403);
        assert_eq!(post(&env, source, &[], body.clone()).await.status, 400);
        if ["stripe", "slack", "standard-webhooks"].contains(scheme) {
            let stale = sign::headers(scheme, secret(source), &body, now() - 3600, "evt-old");
            assert_eq!(post(&env, source, &stale, body.clone()).await.status, 403);
            signatures.extend(signature_values(stale));
        }
        signatures.extend(signature_values(headers));
        bodies.push(body);
    }
    let malformed = vec![(
        "X-Webhook-Signature".to_string(),
        "sha256=nothex".to_string(),
    )];
    assert_eq!(
        post(&env, "fulfillment", &malformed, b"{}".to_vec())
            .await
            .status,
        400
    );
    // An event the processor cannot map: dead-lettered, and logged as such.
    let unmappable =
        json!({"event_id": unique("evt-dlq-"), "event_type": "order.shipped"}).to_string();
    let h = sign::headers(
        "hmac-sha256",
        secret("fulfillment"),
        unmappable.as_bytes(),
        now(),
        "",
    );
    assert_eq!(
        post(&env, "fulfillment", &h, unmappable.clone().into_bytes())
            .await
            .status,
        200
    );
    bodies.push(unmappable.into_bytes());
    eventually(
        "processor dead-letter log",
        Duration::from_secs(60),
        || async {
            processor
                .log_text()
                .contains("Record dead-lettered.")
                .then_some(())
        },
    )
    .await;

    for (who, log) in [
        ("ingest", ingest.log_text()),
        ("processor", processor.log_text()),
    ] {
        for (_, _, s) in SECRETS {
            assert!(
                !log.contains(s) && !log.contains(s.trim_start_matches("whsec_")),
                "{who}: a secret is in the log"
            );
        }
        for sig in &signatures {
            for part in sig.split(['=', ',', ' ']).filter(|p| p.len() >= 16) {
                assert!(
                    !log.contains(part),
                    "{who}: a signature value is in the log"
                );
            }
        }
        for b in &bodies {
            let text = String::from_utf8_lossy(b);
            let escaped = serde_json::to_string(&text).unwrap();
            assert!(
                !log.contains(text.as_ref()) && !log.contains(&escaped[1..escaped.len() - 1]),
                "{who}: a raw body is in the log"
            );
        }
        let lines = json_lines(&log, who);
        // Ingest logs every rejection; the processor its start and the
        // dead letter (at least: libraries add debug lines of their own).
        let least = if who == "ingest" { 6 } else { 2 };
        assert!(lines.len() >= least, "{who} logged {} lines", lines.len());
        for l in &lines {
            for field in ["timestamp", "level", "target", "message"] {
                assert!(l.get(field).is_some(), "{who}: no {field} in {l}");
            }
        }
    }
    let ingest_lines = json_lines(&ingest.log_text(), "ingest");
    let rejected: Vec<_> = ingest_lines
        .iter()
        .filter(|l| l["message"] == "Signature rejected.")
        .collect();
    assert!(rejected.len() >= SECRETS.len() * 2);
    for l in &rejected {
        assert!(
            l["reason"].is_string() && l["source"].is_string() && l["span"]["source"].is_string(),
            "{l}"
        );
    }
    let stored: Vec<_> = ingest_lines
        .iter()
        .filter(|l| l["message"] == "Event stored.")
        .collect();
    assert!(stored.len() >= SECRETS.len());
    for l in &stored {
        for f in ["source", "event_id", "event_type", "trace_id"] {
            assert!(l["span"].get(f).is_some(), "no span.{f} in {l}");
        }
        assert!(l["partition"].is_number() && l["offset"].is_number(), "{l}");
    }
    let processor_lines = json_lines(&processor.log_text(), "processor");
    let dead = processor_lines
        .iter()
        .find(|l| l["message"] == "Record dead-lettered.")
        .expect("dead-letter line");
    for f in [
        "topic",
        "partition",
        "offset",
        "event_id",
        "trace_id",
        "reason",
    ] {
        assert!(dead.get(f).is_some(), "no {f} in {dead}");
    }
}

/// At the production level (`info`) ingest creates no request span (its
/// JSON fields cost ~10 % of the request rate): a stored event is not
/// logged at all, and a rejection's line carries its own fields.
#[tokio::test]
async fn at_info_level_ingest_logs_rejections_with_their_own_fields_and_no_request_span() {
    use crate::ingest::signed;
    let env = TestEnv::new("obs-info").with_log("info");
    env.create_topics();
    let ingest = env.ingest();
    let id = unique("evt-info-");
    let (headers, body, _) = signed("fulfillment", &id);
    assert_eq!(
        post(&env, "fulfillment", &headers, body.clone())
            .await
            .status,
        200
    );
    let mut tampered = body;
    tampered.push(b'\n');
    assert_eq!(
        post(&env, "fulfillment", &headers, tampered).await.status,
        403
    );
    let lines = json_lines(&ingest.log_text(), "ingest");
    let rejected: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "Signature rejected.")
        .collect();
    assert_eq!(rejected.len(), 1, "{lines:?}");
    let l = rejected[0];
    assert_eq!(l["level"], "WARN", "{l}");
    assert_eq!(l["source"], "fulfillment", "{l}");
    assert_eq!(l["scheme"], "hmac-sha256", "{l}");
    assert_eq!(l["reason"], "bad_signature", "{l}");
    assert!(l.get("span").is_none(), "a request span at info: {l}");
    assert!(
        !ingest.log_text().contains(&id),
        "the stored event is in the info log"
    );
}
