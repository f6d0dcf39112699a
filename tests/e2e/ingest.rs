//! hooklog-ingest end to end on Tansu: every scheme stores the raw body keyed
//! by event id; every rejection has its status, JSON error and no record;
//! broker outages answer 503; SIGTERM drains. (Log redaction is tested in
//! `observability.rs`.)

use std::time::{Duration, Instant};

use hooklog_e2e::sign::{self, now};
use hooklog_e2e::{eventually, kafka, metric, secret, Stack, TestEnv, SECRETS};
use hooklog_schemas::trace::TraceParent;
use hooklog_schemas::WebhookEvent;
use serde_json::Value;

pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub json: Value,
}

pub async fn post(
    env: &TestEnv,
    source: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Reply {
    let client = reqwest::Client::new();
    let mut req = client
        .post(format!("{}/webhooks/{source}", env.ingest_url()))
        .body(body)
        .timeout(Duration::from_secs(20));
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let json = resp.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        retry_after,
        json,
    }
}

/// A signed request for `source` with a body carrying `id` where the scheme
/// takes the id from the body.
pub fn signed(source: &str, id: &str) -> (Vec<(String, String)>, Vec<u8>, &'static str) {
    let scheme = SECRETS.iter().find(|(s, _, _)| *s == source).unwrap().1;
    let body = match scheme {
        "stripe" => format!(
            r#"{{"id":"{id}","type":"charge.refunded","data":{{"object":{{"id":"ch_{id}"}}}}}}"#
        ),
        "slack" => format!(
            r#"{{"event_id":"{id}","event":{{"type":"app_mention"}},"type":"event_callback"}}"#
        ),
        "standard-webhooks" => r#"{"type":"email.sent","data":{}}"#.to_string(),
        "hmac-sha256" => format!(r#"{{"event_id":"{id}","event_type":"agent.ping","n":1}}"#),
        _ => r#"{"action":"opened"}"#.to_string(),
    }
    .into_bytes();
    (
        sign::headers(scheme, secret(source), &body, now(), id),
        body,
        scheme,
    )
}

#[tokio::test]
async fn every_scheme_stores_the_raw_body_keyed_by_event_id() {
    let env = TestEnv::new("ingest-ok");
    env.create_topics();
    let _ingest = env.ingest();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for (source, scheme, _) in SECRETS {
        let id = format!("evt-{source}-1");
        let (mut headers, body, _) = signed(source, &id);
        headers.push(("traceparent".into(), incoming.into()));
        let r = post(&env, source, &headers, body.clone()).await;
        assert_eq!(r.status, 200, "{source}: {}", r.json);
        let expected_type = match *scheme {
            "stripe" => "charge.refunded",
            "slack" => "app_mention",
            "standard-webhooks" => "email.sent",
            "hmac-sha256" => "agent.ping",
            "github" => "push",
            _ => "orders/create",
        };
        assert_eq!(r.json["event_id"], id.as_str(), "{source}");
        assert_eq!(r.json["topic"], env.topic(source));
        let rec = kafka::read_at(
            &env.brokers,
            &env.topic(source),
            r.json["partition"].as_i64().unwrap() as i32,
            r.json["offset"].as_i64().unwrap(),
        );
        assert_eq!(rec.key_str(), id, "{source}: record key");
        let ev = WebhookEvent::decode(rec.value.as_deref().unwrap()).unwrap();
        assert_eq!(ev.body, body, "{source}: raw body");
        assert_eq!(
            (ev.event_id.as_str(), ev.source.as_str(), ev.scheme.as_str()),
            (id.as_str(), *source, *scheme)
        );
        assert_eq!(ev.event_type, expected_type);
        assert_eq!(ev.key_id, 0);
        assert_eq!(rec.header("hooklog-source").as_deref(), Some(*source));
        assert_eq!(
            rec.header("hooklog-event-type").as_deref(),
            Some(expected_type)
        );
        let tp = TraceParent::parse(&rec.header("traceparent").unwrap()).unwrap();
        assert_eq!(
            tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736",
            "{source}: trace continued"
        );
        // The signature header is kept for downstream re-verification.
        assert!(!ev.headers.is_empty(), "{source}: headers kept");
    }

    // Non-UTF-8 and whitespace-laden bodies are stored byte for byte.
    for body in [
        b"\xff\xfe\x00 not utf-8 \x80".to_vec(),
        b"{ \"event_id\" :  \"ws-1\" ,\n\t\"event_type\":\"x\" }  \n".to_vec(),
    ] {
        let headers = sign::headers("hmac-sha256", secret("fulfillment"), &body, now(), "");
        let r = post(&env, "fulfillment", &headers, body.clone()).await;
        assert_eq!(r.status, 200, "{}", r.json);
        let rec = kafka::read_at(
            &env.brokers,
            &env.topic("fulfillment"),
            r.json["partition"].as_i64().unwrap() as i32,
            r.json["offset"].as_i64().unwrap(),
        );
        let ev = WebhookEvent::decode(rec.value.as_deref().unwrap()).unwrap();
        assert_eq!(ev.body, body);
        assert_eq!(rec.key_str(), r.json["event_id"].as_str().unwrap());
        let tp = TraceParent::parse(&rec.header("traceparent").unwrap())
            .expect("a new trace is started");
        assert_ne!(tp.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    // A provider retry of the same event is stored again under the same key.
    let (headers, body, _) = signed("stripe", "evt-retry");
    let a = post(&env, "stripe", &headers, body.clone()).await;
    let b = post(&env, "stripe", &headers, body).await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.json["event_id"], b.json["event_id"]);
    assert_eq!(
        a.json["partition"], b.json["partition"],
        "same key, same partition"
    );
    assert_ne!(a.json["offset"], b.json["offset"]);

    // The Slack URL verification handshake is answered and not published.
    let before = kafka::record_count(&env.brokers, &env.topic("slack"));
    let body = br#"{"token":"t","challenge":"abc123","type":"url_verification"}"#.to_vec();
    let headers = sign::headers("slack", secret("slack"), &body, now(), "");
    let r = post(&env, "slack", &headers, body).await;
    assert_eq!(
        (r.status, r.json.clone()),
        (200, serde_json::json!({"challenge": "abc123"}))
    );
    assert_eq!(
        kafka::record_count(&env.brokers, &env.topic("slack")),
        before
    );
}

#[tokio::test]
async fn rejections_have_their_status_and_store_nothing() {
    let stack = hooklog_e2e::shared_stack();
    let env = TestEnv::on(
        "ingest-reject",
        &stack.brokers,
        &stack.redis_url,
        "[server]\nmax_body_bytes = 2048",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let client = reqwest::Client::new();
    let mut cases: Vec<(&str, u16, &str, Reply)> = Vec::new();

    // Bad signature, per scheme: 403.
    for (source, _, _) in SECRETS {
        let (headers, mut body, _) = signed(source, "evt-bad");
        body.push(b' ');
        cases.push((
            source,
            403,
            "invalid_signature",
            post(&env, source, &headers, body).await,
        ));
        // Missing signature headers: 400.
        let (_, body, _) = signed(source, "evt-missing");
        cases.push((
            source,
            400,
            "missing_header",
            post(&env, source, &[], body).await,
        ));
    }
    // Stale and future timestamps: 403.
    for (source, scheme) in [
        ("stripe", "stripe"),
        ("slack", "slack"),
        ("resend", "standard-webhooks"),
    ] {
        for ts in [now() - 301, now() + 400] {
            let (_, body, _) = signed(source, "evt-old");
            let headers = sign::headers(scheme, secret(source), &body, ts, "evt-old");
            cases.push((
                source,
                403,
                "timestamp_out_of_tolerance",
                post(&env, source, &headers, body).await,
            ));
        }
    }
    // Malformed header: 400.
    let h = vec![(
        "X-Webhook-Signature".to_string(),
        "sha256=nothex".to_string(),
    )];
    cases.push((
        "fulfillment",
        400,
        "malformed_header",
        post(&env, "fulfillment", &h, b"{}".to_vec()).await,
    ));
    // Unknown source: 404.
    let (headers, body, _) = signed("fulfillment", "evt-x");
    cases.push((
        "nope",
        404,
        "unknown_source",
        post(&env, "nope", &headers, body).await,
    ));
    // Body over the limit with a Content-Length: 413.
    let big = vec![b'a'; 4096];
    let headers = sign::headers("hmac-sha256", secret("fulfillment"), &big, now(), "");
    cases.push((
        "fulfillment",
        413,
        "body_too_large",
        post(&env, "fulfillment", &headers, big.clone()).await,
    ));
    // ...and streamed without one (chunked): still 413.
    // Just over the limit, so the client has sent everything by the time the
    // server answers early.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big[..2560].chunks(512).map(|c| Ok(c.to_vec())).collect();
    let mut req = client
        .post(format!("{}/webhooks/fulfillment", env.ingest_url()))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)));
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    cases.push((
        "fulfillment",
        413,
        "body_too_large",
        Reply {
            status,
            retry_after: None,
            json: resp.json().await.unwrap(),
        },
    ));
    // Wrong method: 405.
    // A fresh client: the early 413 closed the pooled connection.
    let resp = reqwest::Client::new()
        .get(format!("{}/webhooks/fulfillment", env.ingest_url()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    cases.push((
        "fulfillment",
        405,
        "method_not_allowed",
        Reply {
            status,
            retry_after: None,
            json: resp.json().await.unwrap(),
        },
    ));

    for (source, status, code, reply) in &cases {
        assert_eq!(reply.status, *status, "{source}: {}", reply.json);
        assert_eq!(reply.json["error"], *code, "{source}");
        assert!(reply.json["message"].is_string());
        let text = reply.json.to_string();
        for (_, _, s) in SECRETS {
            assert!(!text.contains(s), "error body leaks a secret");
        }
        assert!(!text.contains("sha256="), "error body echoes a signature");
    }
    for (source, _, _) in SECRETS {
        assert_eq!(
            kafka::record_count(&env.brokers, &env.topic(source)),
            0,
            "{source}: a rejected request was stored"
        );
    }
}

/// The bodies in flight are bounded in bytes as well as in number
/// (`server.max_in_flight_bytes`): a body with no room left is refused with
/// 429 and Retry-After before it is read, and the room comes back once the
/// body holding it is done.
#[tokio::test]
async fn bodies_in_flight_are_bounded_in_bytes() {
    use tokio::io::AsyncWriteExt;

    let stack = hooklog_e2e::shared_stack();
    let env = TestEnv::on(
        "ingest-bytes",
        &stack.brokers,
        &stack.redis_url,
        "[server]\nmax_body_bytes = 4096\nmax_in_flight_bytes = 4096",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let (headers, body, _) = signed("fulfillment", "evt-bytes-before");
    assert_eq!(post(&env, "fulfillment", &headers, body).await.status, 200);

    // A client declares a 4,090-byte body and sends only its start: it
    // holds 4,090 of the 4,096 bytes while ingest waits for the rest.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", env.ingest_port))
        .await
        .unwrap();
    slow.write_all(
        b"POST /webhooks/fulfillment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 4090\r\n\r\n{\"event_type\":",
    )
    .await
    .unwrap();
    // Its handler has taken the room once it counts as in flight (the
    // count and the room are taken in one step, before the body is read).
    eventually(
        "the slow request in flight",
        Duration::from_secs(10),
        || async {
            let n = metric(&env.ingest_url(), "hooklog_ingest_in_flight_requests", &[]).await;
            (n >= 1.0).then_some(())
        },
    )
    .await;
    let (headers, body, _) = signed("fulfillment", "evt-bytes-refused");
    let refused = post(&env, "fulfillment", &headers, body).await;
    assert_eq!(refused.status, 429, "{}", refused.json);
    assert_eq!(refused.json["error"], "too_many_requests");
    assert_eq!(refused.retry_after.as_deref(), Some("2"));

    // The slow client goes away: its room is given back.
    drop(slow);
    let mut status = 0;
    for i in 0..20 {
        let (headers, body, _) = signed("fulfillment", &format!("evt-bytes-after-{i}"));
        status = post(&env, "fulfillment", &headers, body).await.status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        status, 200,
        "the room of a body that ended did not come back"
    );
}

#[tokio::test]
async fn broker_down_answers_503_then_recovers_without_restart() {
    // The broker goes away behind a proxy: see hooklog_e2e::proxy for why
    // killing and restarting Tansu itself is not an option.
    let (stack, proxy) = Stack::start_behind_proxy();
    let env = TestEnv::on(
        "ingest-503",
        &stack.brokers,
        &stack.redis_url,
        "[server]\nmax_in_flight = 1",
    );
    env.create_topics();
    let _ingest = env.ingest();
    let (headers, body, _) = signed("fulfillment", "evt-before");
    assert_eq!(post(&env, "fulfillment", &headers, body).await.status, 200);

    proxy.down();
    for i in 0..3 {
        let (headers, body, _) = signed("fulfillment", &format!("evt-down-{i}"));
        let started = Instant::now();
        let r = post(&env, "fulfillment", &headers, body).await;
        assert_eq!(r.status, 503, "{}", r.json);
        assert_eq!(r.json["error"], "kafka_unavailable");
        assert_eq!(r.retry_after.as_deref(), Some("2"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "503 took {:?}",
            started.elapsed()
        );
    }

    // One request holds the only in-flight slot while the broker is away:
    // a concurrent one is refused with 429 and Retry-After.
    let (h1, b1, _) = signed("fulfillment", "evt-slot-1");
    let (h2, b2, _) = signed("fulfillment", "evt-slot-2");
    let first = post(&env, "fulfillment", &h1, b1);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        post(&env, "fulfillment", &h2, b2).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status, 503);
    assert_eq!(second.status, 429, "{}", second.json);
    assert_eq!(second.json["error"], "too_many_requests");
    assert_eq!(second.retry_after.as_deref(), Some("2"));

    proxy.up();
    let mut ok = false;
    for i in 0..40 {
        let (headers, body, _) = signed("fulfillment", &format!("evt-after-{i}"));
        let r = post(&env, "fulfillment", &headers, body).await;
        assert!(r.status == 200 || r.status == 503, "{}", r.status);
        if r.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ok, "ingest did not recover after the broker came back");
}

#[tokio::test]
async fn sigterm_during_a_burst_never_answers_200_without_the_record() {
    let env = TestEnv::new("ingest-term");
    env.create_topics();
    let mut ingest = env.ingest();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One client, one connection per request. A client per request made
    // this single-threaded test spend seconds building clients, inside the
    // other requests' timeouts ("a request hung" on a loaded machine).
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let counter = done.clone();
        let (headers, body, _) = signed("fulfillment", &format!("evt-burst-{i}"));
        let url = format!("{}/webhooks/fulfillment", env.ingest_url());
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = client.post(url).body(body).timeout(Duration::from_secs(15));
            for (k, v) in &headers {
                req = req.header(k, v);
            }
            let out = match req.send().await {
                Ok(resp) => Some((
                    resp.status().as_u16(),
                    resp.json::<Value>().await.unwrap_or(Value::Null),
                )),
                Err(e) => {
                    assert!(!e.is_timeout(), "a request hung");
                    None
                }
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            out
        }));
        if i == 150 {
            // SIGTERM once some requests finished and many are in flight.
            while done.load(std::sync::atomic::Ordering::SeqCst) < 20 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ingest.send_signal("-TERM");
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    let stored: std::collections::HashMap<(i64, i64), String> =
        kafka::read_all(&env.brokers, &env.topic("fulfillment"))
            .into_iter()
            .map(|r| ((i64::from(r.partition), r.offset), r.key_str()))
            .collect();
    let mut ok = 0;
    for (status, json) in answers {
        if status == 200 {
            ok += 1;
            let at = (
                json["partition"].as_i64().unwrap(),
                json["offset"].as_i64().unwrap(),
            );
            assert_eq!(
                stored.get(&at).map(String::as_str),
                json["event_id"].as_str(),
                "200 without its record"
            );
        } else {
            assert!(status >= 400, "unexpected {status}");
        }
    }
    assert!(ok > 0, "no request succeeded before shutdown");
    assert!(
        ingest.wait_exit(Duration::from_secs(30)),
        "ingest did not exit after SIGTERM"
    );
    assert!(
        ingest.log_text().contains("Ingest stopped."),
        "no clean shutdown:\n{}",
        ingest.log_text()
    );
}
