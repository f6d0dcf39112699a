//! `make bench`: Hooklog next to the limits of its parts, in one run on one
//! machine, on Tansu (memory storage: every reader starts at the log's
//! beginning) and Redis on loopback. Prints a table and writes
//! `docs/benchmarks.md` and `bench/results/<timestamp>.json`.
//!
//! `BENCH_QUICK=1`: short runs; `BENCH_SMOKE=1`: a few hundred requests and
//! records, no file written (run by `make test` so the harness cannot rot);
//! `BENCH_RECORDS=N`: preload N records for the processor and the rebuild;
//! `BENCH_BATCH=N`: the processor's `batch_size` for its measured run
//! (default 10,000: a catch-up's setting; see `bench/limits.md`);
//! `BENCH_NO_WRITE=1`: print, write no file (`bench/profile.sh`).
//! `BENCH_COMPARE=a,b`: ingest, the processor and its rebuild, of the builds in
//! `target/a/` and `target/b/` taking turns (`BENCH_TURNS`, default 3) on
//! the same load, each in a namespace of its own (`BENCH_ONLY=ingest` or
//! `processor` for one of them); prints each turn and writes no file: how
//! `bench/limits.md` measures a change side by side.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hooklog_e2e::events::{self, raw};
use hooklog_e2e::{
    free_port, kafka, metric, process_cpu_secs, secret, sign, Service, Stack, TestEnv,
};
use hooklog_schemas::headers;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::json;

/// Records in flight for the publish path alone beyond ingest's 64: by
/// Little's law its rate is the records in flight over the time to an ack,
/// and the open-loop producer's broker limit keeps thousands in flight.
const IN_FLIGHT_CURVE: [usize; 2] = [512, 4096];

/// One load run: the latency of each request answered after the warm-up
/// (µs), how long that part took, how many of them failed, and how many
/// requests were sent in all (warm-up included: the CPU counters see those).
struct Run {
    latencies_us: Vec<u64>,
    secs: f64,
    non_2xx: u64,
    sent: u64,
}

/// One or more runs against the same server, merged.
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    non_2xx: u64,
    requests: u64,
    /// Each run's req/s, in order.
    rounds_rps: Vec<f64>,
}

impl Load {
    fn of(runs: &[Run]) -> Self {
        let mut lat: Vec<u64> = runs.iter().flat_map(|r| r.latencies_us.clone()).collect();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        let secs: f64 = runs.iter().map(|r| r.secs).sum();
        Load {
            rps: lat.len() as f64 / secs.max(0.001),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
            requests: lat.len() as u64,
            rounds_rps: runs
                .iter()
                .map(|r| r.latencies_us.len() as f64 / r.secs)
                .collect(),
        }
    }
}

/// Signed 1 KB generic-scheme bodies with unique event ids, `concurrency`
/// workers, `duration` after a 1 s warm-up, to 127.0.0.1 only.
///
/// Each worker drives its own keep-alive HTTP/1.1 connection with hyper's
/// bare client (reconnecting when the server closes it): the generator
/// shares the 2 cores with what it measures, and through reqwest's pool and
/// layers it spent 1.7 times the CPU per request (43 against 25.5 ms per
/// 1,000 requests, measured side by side).
async fn load(
    url: String,
    concurrency: usize,
    duration: Duration,
    max_requests: u64,
    warmup: Duration,
) -> Run {
    let uri: hyper::Uri = url.parse().expect("a load URL");
    let authority = uri.authority().expect("a load URL with a host").to_string();
    let path = uri.path().to_owned();
    let sent = Arc::new(AtomicU64::new(0));
    let warm_until = Instant::now() + warmup;
    let end = warm_until + duration;
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (authority, path, sent) = (authority.clone(), path.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            let (mut lat, mut bad, mut n) = (Vec::new(), 0u64, 0u64);
            let pad = "x".repeat(900);
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let now = Instant::now();
                if now >= end || sent.fetch_add(1, Ordering::Relaxed) >= max_requests {
                    break;
                }
                n += 1;
                let body = format!(
                    r#"{{"event_id":"b-{w}-{n}-{}","event_type":"bench.event","pad":"{pad}"}}"#,
                    now.elapsed().as_nanos()
                );
                let sig = sign::headers(
                    "hmac-sha256",
                    secret("fulfillment"),
                    body.as_bytes(),
                    sign::now(),
                    "",
                );
                let started = Instant::now();
                let ok = match ready_connection(&mut conn, &authority).await {
                    Some(sender) => {
                        let request = hyper::Request::post(path.as_str())
                            .header(hyper::header::HOST, authority.as_str())
                            .header(sig[0].0.as_str(), sig[0].1.as_str())
                            .body(Full::new(Bytes::from(body)))
                            .expect("a valid request");
                        match sender.send_request(request).await {
                            Ok(response) => {
                                let status = response.status();
                                // Read the whole answer so the connection is reused.
                                let read = response.into_body().collect().await.is_ok();
                                status.is_success() && read
                            }
                            Err(_) => {
                                conn = None;
                                false
                            }
                        }
                    }
                    None => false,
                };
                if started >= warm_until {
                    lat.push(started.elapsed().as_micros() as u64);
                    bad += u64::from(!ok);
                }
            }
            (lat, bad)
        }));
    }
    let (mut lat, mut bad) = (Vec::new(), 0);
    for w in workers {
        let (l, b) = w.await.unwrap();
        lat.extend(l);
        bad += b;
    }
    Run {
        latencies_us: lat,
        secs: secs_since(warm_until),
        non_2xx: bad,
        sent: sent.load(Ordering::Relaxed).min(max_requests),
    }
}

/// The worker's connection, ready for a request: the open one, or a new
/// one when there is none or the server closed it (gunicorn's sync workers
/// close after every answer). None when connecting fails.
async fn ready_connection<'a>(
    conn: &'a mut Option<SendRequest<Full<Bytes>>>,
    authority: &str,
) -> Option<&'a mut SendRequest<Full<Bytes>>> {
    if let Some(sender) = conn.as_mut() {
        if sender.ready().await.is_err() {
            *conn = None;
        }
    }
    if conn.is_none() {
        let stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        *conn = Some(sender);
    }
    conn.as_mut()
}

/// A server under load, and whose CPU counts as its own.
struct Target<'a> {
    url: String,
    server: &'a Service,
    /// Count the server's child processes too (gunicorn's workers).
    with_children: bool,
}

/// CPU of the server under load, the broker and the load generator (this
/// process): seconds, or µs per request.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    broker: f64,
    generator: f64,
}

impl Cpu {
    fn map(self, f: impl Fn(f64) -> f64) -> Cpu {
        Cpu {
            server: f(self.server),
            broker: f(self.broker),
            generator: f(self.generator),
        }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, rhs: Cpu) -> Cpu {
        Cpu {
            server: self.server - rhs.server,
            broker: self.broker - rhs.broker,
            generator: self.generator - rhs.generator,
        }
    }
}

impl std::ops::AddAssign for Cpu {
    fn add_assign(&mut self, rhs: Cpu) {
        self.server += rhs.server;
        self.broker += rhs.broker;
        self.generator += rhs.generator;
    }
}

impl Target<'_> {
    /// CPU seconds used so far.
    fn cpu_now(&self, broker: Option<&Service>) -> Cpu {
        let server = if self.with_children {
            self.server.tree_cpu_secs()
        } else {
            self.server.cpu_secs()
        };
        // NaN where /proc cannot say: the table shows it rather than a 0.
        Cpu {
            server: server.unwrap_or(f64::NAN),
            broker: broker.and_then(Service::cpu_secs).unwrap_or(f64::NAN),
            generator: process_cpu_secs(std::process::id()).unwrap_or(f64::NAN),
        }
    }
}

/// A target's runs merged, and the CPU each request cost.
struct Measured {
    load: Load,
    /// CPU per request sent, µs.
    cpu_us: Cpu,
}

/// Loads each target in turn, `rounds` times over (a, b, a, b, …), so the
/// slow moments of a shared machine fall on all of them rather than on one.
async fn side_by_side(
    targets: &[Target<'_>],
    broker: Option<&Service>,
    rounds: usize,
    duration: Duration,
    max_requests: u64,
    warmup: Duration,
) -> Vec<Measured> {
    let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    let mut cpu = vec![Cpu::default(); targets.len()];
    for _ in 0..rounds {
        for (i, target) in targets.iter().enumerate() {
            let before = target.cpu_now(broker);
            let run = load(target.url.clone(), 64, duration, max_requests, warmup).await;
            let after = target.cpu_now(broker);
            cpu[i] += after - before;
            runs[i].push(run);
        }
    }
    runs.iter()
        .zip(cpu)
        .map(|(runs, cpu)| {
            let sent = runs.iter().map(|r| r.sent).sum::<u64>().max(1) as f64;
            Measured {
                load: Load::of(runs),
                cpu_us: cpu.map(|secs| secs * 1e6 / sent),
            }
        })
        .collect()
}

/// Ingest's publish path alone, without HTTP or verification: `in_flight`
/// tasks, each publishing a 1 KB record through ingest's own `Publisher`
/// (its producer settings) and awaiting the ack before the next, as
/// ingest's requests do at concurrency `in_flight`. Records per second
/// after the warm-up.
async fn publish_alone(
    brokers: &str,
    topic: &str,
    in_flight: usize,
    duration: Duration,
    warmup: Duration,
) -> f64 {
    let kafka = hooklog_schemas::kafka::KafkaConfig {
        brokers: brokers.to_owned(),
        ..Default::default()
    };
    let publisher = hooklog_ingest::publish::Publisher::new(&kafka, 10_000).expect("a publisher");
    let warm_until = Instant::now() + warmup;
    let end = warm_until + duration;
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..in_flight {
        let (publisher, topic, acked) = (publisher.clone(), topic.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let payload = vec![b'x'; 1024];
            // The headers ingest attaches to each record.
            let record_headers: [(&str, &[u8]); 3] = [
                (
                    headers::TRACEPARENT,
                    b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                (headers::SOURCE, b"fulfillment"),
                (headers::EVENT_TYPE, b"bench.event"),
            ];
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let key = format!("pa-{w}-{n}");
                let started = Instant::now();
                publisher
                    .publish(&topic, &key, &payload, &record_headers)
                    .await
                    .expect("the broker acknowledges");
                if started >= warm_until {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    acked.load(Ordering::Relaxed) as f64 / secs_since(warm_until)
}

/// Seconds since the warm-up ended (never 0: rates divide by it).
fn secs_since(warm_until: Instant) -> f64 {
    Instant::now()
        .saturating_duration_since(warm_until)
        .as_secs_f64()
        .max(0.001)
}

/// Starts the seed article's receiver (bench/seed_receiver.py) under
/// gunicorn, one sync worker per core, in a venv under .tools/; None (with
/// the reason printed) when its packages cannot be installed. Skipped in
/// the smoke run.
fn seed_receiver(env: &TestEnv, smoke: bool) -> Option<(Service, u16)> {
    if smoke {
        return None;
    }
    let root = hooklog_e2e::root();
    let venv = root.join(".tools/bench-venv");
    let gunicorn = venv.join("bin/gunicorn");
    if !gunicorn.exists() {
        let ok = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "-r"])
                .arg(root.join("bench/seed-requirements.txt"))
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("bench: seed-style receiver skipped: its Python packages did not install");
            return None;
        }
    }
    let port = free_port();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bind = format!("127.0.0.1:{port}");
    let workers = cores.to_string();
    let chdir = root.join("bench").display().to_string();
    let topic = env.topic("fulfillment");
    let mut server = Service::new(
        "seed-receiver",
        gunicorn,
        &[
            "-w",
            &workers,
            "-b",
            &bind,
            "--chdir",
            &chdir,
            "seed_receiver:app",
        ],
        &[
            ("SEED_SECRET", secret("fulfillment")),
            ("SEED_BROKERS", &env.brokers),
            ("SEED_TOPIC", &topic),
        ],
    );
    server.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            eprintln!(
                "bench: seed-style receiver did not start; see {}",
                server.log.display()
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1)); // workers import the app
    Some((server, port))
}

/// The physical HTTP limit: axum reading the body and answering 200.
async fn bare_axum() -> u16 {
    let port = free_port();
    let app = axum::Router::new()
        .fallback(|body: axum::body::Bytes| async move { format!("{}", body.len()) });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// RFC 3339 text for `secs` seconds after 2025-03-01T00:00:00Z, wrapping
/// after 28 days (2.4 million records): the preloaded orders' event times.
fn event_time(secs: usize) -> String {
    format!(
        "2025-03-{:02}T{:02}:{:02}:{:02}Z",
        1 + secs / 86_400 % 28,
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// Records as (key, value) pairs.
type Keyed = Vec<(String, Vec<u8>)>;

/// The processor's and the rebuild's records, spread over the three seed
/// projections: a third Stripe `charge.succeeded` (each updates its charge
/// and its customer, one of 1,000), a third FulfillmentAgent orders
/// (`order.shipped`, then `order.delivered` for the same order: half of
/// them update an order that exists; ids are body hashes, as ingest gives
/// the seed's orders), a third `customer.signed_up` (the
/// first 1,000 for customers who are also charged).
struct Preload {
    /// Source → the (key, raw record) pairs for its raw topic.
    records: Vec<(&'static str, Keyed)>,
    /// Projection → how many events it applies once all are in.
    applies: Vec<(&'static str, f64)>,
}

impl Preload {
    fn new(n: usize, tag: &str) -> Self {
        let (mut stripe, mut fulfillment, mut accounts) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let id = format!("evt_{tag}_{i}");
            match i % 3 {
                0 => {
                    let body = events::stripe_charge(
                        &id,
                        &format!("ch_{tag}_{i}"),
                        &format!("cus_{}", i % 1000),
                        100 + i as i64 % 900,
                        1_740_000_000 + i as i64,
                    );
                    let record = raw("stripe", "stripe", &id, "charge.succeeded", &body);
                    stripe.push((id, record.encode()));
                }
                1 => {
                    let j = i / 3;
                    let order = format!("ORD-{tag}-{}", j / 2);
                    let (event_type, body) = match j % 2 {
                        0 => (
                            "order.shipped",
                            events::order_shipped(&order, &event_time(i)),
                        ),
                        _ => (
                            "order.delivered",
                            events::order_delivered(&order, &event_time(i)),
                        ),
                    };
                    // The seed's orders carry no id: ingest's default
                    // then names them by their body's hash.
                    let id = hooklog_ingest::verify::body_hash_id(body.as_bytes());
                    let record = raw("fulfillment", "hmac-sha256", &id, event_type, &body);
                    fulfillment.push((id, record.encode()));
                }
                _ => {
                    let customer = format!("cus_{}", i / 3);
                    let email = format!("{customer}@example.com");
                    let body = events::customer_signed_up(&id, &customer, &email);
                    let record = raw("accounts", "hmac-sha256", &id, "customer.signed_up", &body);
                    accounts.push((id, record.encode()));
                }
            }
        }
        let applies = vec![
            ("charges", stripe.len() as f64),
            ("orders", fulfillment.len() as f64),
            ("customers", (stripe.len() + accounts.len()) as f64),
        ];
        Self {
            records: vec![
                ("stripe", stripe),
                ("fulfillment", fulfillment),
                ("accounts", accounts),
            ],
            applies,
        }
    }

    /// Writes every record to its source's raw topic in `env`.
    async fn produce(&self, producer: &rdkafka::producer::FutureProducer, env: &TestEnv) {
        for (source, records) in &self.records {
            kafka::produce_all(producer, &env.topic(source), records).await;
        }
    }

    /// Waits until the processor at `url` has applied every event to every
    /// projection; returns how long that took.
    async fn wait_applied(&self, url: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        for (projection, n) in &self.applies {
            while metric(url, "hooklog_processor_applied_events_total", &[projection]).await < *n {
                assert!(
                    started.elapsed() < timeout,
                    "processor did not apply {n} events to {projection} in {timeout:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        started.elapsed()
    }
}

#[tokio::main]
async fn main() {
    let smoke = std::env::var("BENCH_SMOKE").is_ok();
    let quick = smoke || std::env::var("BENCH_QUICK").is_ok();
    // Ingest and the seed-style receiver take turns, `rounds` loads of
    // `duration` each.
    let (rounds, duration) = if smoke {
        (1, Duration::from_secs(1))
    } else if quick {
        (2, Duration::from_secs(3))
    } else {
        (3, Duration::from_secs(7))
    };
    let max_requests = if smoke { 300 } else { u64::MAX };
    let warmup = Duration::from_secs(if smoke { 0 } else { 1 });
    let records = records_from_env("BENCH_RECORDS").unwrap_or(if smoke {
        2_000
    } else if quick {
        100_000
    } else {
        1_000_000
    });
    let batch_size = records_from_env("BENCH_BATCH").unwrap_or(10_000);
    if let Ok(builds) = std::env::var("BENCH_COMPARE") {
        let turns = records_from_env("BENCH_TURNS").unwrap_or(3);
        let builds: Vec<&str> = builds.split(',').collect();
        return compare(&builds, turns, records, batch_size).await;
    }
    let started_at = chrono_like_now();
    let stack = Stack::start();
    let env = TestEnv::on(
        "bench",
        &stack.brokers,
        &stack.redis_url,
        "[processor]\npartitions = 6",
    )
    // The production default: a debug line per request would be measured.
    .with_log("info");
    env.create_topics();

    // 1. Ingest (verified + acks=all) and the seed-style receiver (Flask +
    //    gunicorn + confluent-kafka), loaded in turns; then the bare HTTP
    //    limit.
    let ingest = env.ingest();
    let seed = seed_receiver(&env, smoke);
    let mut targets = vec![Target {
        url: format!("{}/webhooks/fulfillment", env.ingest_url()),
        server: &ingest,
        with_children: false,
    }];
    if let Some((server, port)) = &seed {
        targets.push(Target {
            url: format!("http://127.0.0.1:{port}/webhooks/fulfillment"),
            server,
            with_children: true,
        });
    }
    let mut measured = side_by_side(
        &targets,
        stack.tansu.as_ref(),
        rounds,
        duration,
        max_requests,
        warmup,
    )
    .await
    .into_iter();
    drop(targets);
    let hooklog_measured = measured.next().expect("ingest was measured");
    let seed_measured = measured.next();
    let hooklog = &hooklog_measured.load;
    let seed_style = seed_measured.as_ref().map(|m| &m.load);
    let ingest_rss = ingest.peak_rss_kib().unwrap_or(0);
    drop(ingest);
    if let Some((mut server, _)) = seed {
        server.kill();
    }
    let port = bare_axum().await;
    let bare = Load::of(&[load(
        format!("http://127.0.0.1:{port}/webhooks/fulfillment"),
        64,
        duration * rounds as u32,
        max_requests,
        warmup,
    )
    .await]);

    let producer = kafka::producer(&env.brokers);

    // 3. Processor from start to all applied, then the batch-size-1 baseline,
    //    each in a namespace of its own: their raw topics hold only the
    //    preloaded records (the ingest runs' records would otherwise be
    //    consumed in the measured run without being counted, and replayed
    //    by the rebuild).
    let penv = TestEnv::on(
        "bench-processor",
        &stack.brokers,
        &stack.redis_url,
        &format!("[processor]\npartitions = 6\nbatch_size = {batch_size}"),
    )
    .with_log("info");
    penv.create_topics();
    let measured_load = Preload::new(records, "a");
    measured_load.produce(&producer, &penv).await;
    let redis_before = redis_cpu(&stack.redis_url).await;
    let mut processor = penv.processor();
    let proc_time = measured_load
        .wait_applied(&penv.processor_url(), Duration::from_secs(1800))
        .await;
    let proc_rss = processor.peak_rss_kib().unwrap_or(0);
    let proc_cpu = processor.cpu_secs().unwrap_or(f64::NAN);
    let redis_after = redis_cpu(&stack.redis_url).await;
    let (redis_main, redis_forks) = (
        redis_after.0 - redis_before.0,
        redis_after.1 - redis_before.1,
    );
    // Where the processor's time went: batches, and how long each took from
    // its plan and Redis apply to its last changelog ack (two stages: the
    // next batch is applied while one waits for its acks).
    // A batch is counted once its changelog is acknowledged, a little after
    // its events count as applied: wait until the count settles.
    let purl = penv.processor_url();
    let batch_count = || {
        metric(
            &purl,
            "hooklog_processor_apply_batch_duration_seconds_count",
            &[],
        )
    };
    let mut batches = batch_count().await;
    let waiting = Instant::now();
    while waiting.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = batch_count().await;
        if now == batches && now >= 1.0 {
            break;
        }
        batches = now;
    }
    let apply_secs = metric(
        &purl,
        "hooklog_processor_apply_batch_duration_seconds_sum",
        &[],
    )
    .await;
    // And where the CPU went: on these 2 cores the processor, Redis and
    // Redis's forked AOF rewrites (invisible in Redis's own process) share
    // what the machine has.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let secs = proc_time.as_secs_f64();
    let diagnosis = format!(
        "{batches:.0} batches of {:.0} records on average, each {:.0} ms on average from its plan to its last changelog ack (apply lanes start on the next batches meanwhile); the run took {secs:.1} s. CPU over the run: processor {proc_cpu:.1} s, Redis {redis_main:.1} s (busy {:.0} % of the run; its commands are single-threaded), Redis's AOF rewrites {redis_forks:.1} s; {:.1} of the {:.1} CPU-seconds {cores} cores offer, with Tansu and the load generator besides",
        records as f64 / batches.max(1.0),
        1000.0 * apply_secs / batches.max(1.0),
        100.0 * redis_main / secs,
        proc_cpu + redis_main + redis_forks,
        secs * cores as f64,
    );
    println!("processor: {diagnosis}");
    let proc_rate = records as f64 / proc_time.as_secs_f64();
    // What the run left in Redis (before the rebuild adds a version).
    let memory = redis_memory(
        &stack.redis_url,
        &penv.prefix,
        &["charges", "orders", "customers"],
    )
    .await;

    // 4. Rebuild of the same records into a new version.
    let t = Instant::now();
    let (ok, out) =
        penv.processor_cmd(&["rebuild", "--projection", "customers", "--grace-secs", "0"]);
    assert!(ok, "rebuild failed: {out}");
    let rebuild_wall = t.elapsed().as_secs_f64();
    // The replay reads every raw topic of its namespace, and the command
    // also starts a process and deletes the old version: rate
    // the replay on what it reports, and show the whole command beside it.
    let (replayed, replay_secs) = replay_figures(&out).expect("rebuild reports its replay");
    let rebuild_rate = replayed / replay_secs;
    let rebuild_note = format!(
        "the rebuild replayed {replayed:.0} records (those of the raw topics of the customers' sources, Stripe and accounts: a rebuild reads only the topics its projection's rules can match) in {replay_secs:.1} s; the whole command, with process start and the deletion of the old version, took {rebuild_wall:.1} s"
    );
    println!("rebuild: {rebuild_note}");
    processor.kill();

    // 2. The broker limit: the producer alone, same 1 KB records, many in
    //    flight, into the ingest runs' namespace (measured after the
    //    processor runs, so they do not share the broker with it).
    let payloads: Vec<(String, Vec<u8>)> = (0..records.min(200_000))
        .map(|i| (format!("p-{i}"), vec![b'x'; 1024]))
        .collect();
    let t = Instant::now();
    kafka::produce_all(&producer, &env.topic("github"), &payloads).await;
    let producer_rps = payloads.len() as f64 / t.elapsed().as_secs_f64();
    let publish_rps =
        publish_alone(&env.brokers, &env.topic("shopify"), 64, duration, warmup).await;
    // The same path with more records in flight than ingest's 64 requests
    // can have: how far the broker limit above depends on them. Shorter
    // loads: Tansu's memory storage keeps every record.
    let mut in_flight_rps = Vec::new();
    if !smoke {
        for in_flight in IN_FLIGHT_CURVE {
            let short = duration.min(Duration::from_secs(3));
            let topic = env.topic("shopify");
            let rps = publish_alone(&env.brokers, &topic, in_flight, short, warmup).await;
            in_flight_rps.push((in_flight, rps));
        }
    }

    let naive_records = (records / 20).max(500);
    let naive = TestEnv::on(
        "bench-naive",
        &stack.brokers,
        &stack.redis_url,
        "[processor]\npartitions = 6\nbatch_size = 1",
    )
    .with_log("info");
    naive.create_topics();
    let naive_load = Preload::new(naive_records, "b");
    naive_load.produce(&producer, &naive).await;
    let _naive_proc = naive.processor();
    let naive_time = naive_load
        .wait_applied(&naive.processor_url(), Duration::from_secs(1800))
        .await;
    let naive_rate = naive_records as f64 / naive_time.as_secs_f64();

    let batch_row = format!("processor, events/s (batch {})", thousands(batch_size));
    let rows = vec![
        (
            "ingest → Tansu (verified, acks=all), req/s",
            hooklog.rps,
            "≥ 0.8 × producer alone, ≥ 10 × seed-style".to_string(),
        ),
        (
            "seed-style Flask + gunicorn + confluent-kafka, req/s",
            seed_style.map_or(f64::NAN, |s| s.rps),
            "baseline (seed article)".into(),
        ),
        (
            "bare axum (read body, 200), req/s",
            bare.rps,
            "HTTP limit".into(),
        ),
        (
            "rdkafka producer alone (1 KB, many in flight), msg/s",
            producer_rps,
            "broker limit".into(),
        ),
        (
            "ingest's publish path alone (64 records in flight, each awaited), msg/s",
            publish_rps,
            "broker limit at ingest's concurrency".into(),
        ),
        (
            batch_row.as_str(),
            proc_rate,
            "≥ 50,000 and ≥ 10 × batch 1".into(),
        ),
        (
            "processor, events/s (batch 1)",
            naive_rate,
            "naive baseline".into(),
        ),
        ("rebuild, events/s", rebuild_rate, "≥ 100,000".into()),
    ];
    let mut table = String::from("| measure | value | target / role |\n|---|---:|---|\n");
    for (name, v, target) in &rows {
        table.push_str(&format!("| {name} | {v:.0} | {target} |\n"));
    }
    table.push_str(&format!(
        "| ingest latency at concurrency 64, ms | p50 {:.2} / p99 {:.2} / p99.9 {:.2} | p99 ≤ 50 |\n| ingest non-2xx | {} of {} | 0 |\n| peak RSS ingest / processor, MiB | {:.1} / {:.1} | ingest ≤ 64 |\n",
        hooklog.p50_ms, hooklog.p99_ms, hooklog.p999_ms, hooklog.non_2xx, hooklog.requests, ingest_rss as f64 / 1024.0, proc_rss as f64 / 1024.0
    ));
    if !in_flight_rps.is_empty() {
        let curve = std::iter::once((64, publish_rps))
            .chain(in_flight_rps.iter().copied())
            .collect::<Vec<_>>();
        let join = |f: &dyn Fn(&(usize, f64)) -> String| {
            curve.iter().map(f).collect::<Vec<_>>().join(" / ")
        };
        table.push_str(&format!(
            "| ingest's publish path alone at {} records in flight: msg/s (ms to an ack) | {} ({}) | rate = records in flight ÷ time to an ack |\n",
            join(&|(n, _)| thousands(*n)),
            join(&|(_, r)| format!("{r:.0}")),
            join(&|(n, r)| format!("{:.1}", 1000.0 * *n as f64 / r)),
        ));
    }
    let cpu_cell = |name: &str, m: &Measured| {
        format!(
            "{name} {:.0} + {:.0} ({:.0})",
            m.cpu_us.server, m.cpu_us.broker, m.cpu_us.generator
        )
    };
    table.push_str(&format!(
        "| CPU per request, µs: server + Tansu (load generator) | {}{} | |\n",
        cpu_cell("ingest", &hooklog_measured),
        seed_measured.as_ref().map_or(String::new(), |m| format!(
            "; {}",
            cpu_cell("seed-style", m)
        ))
    ));
    // The same work costs more CPU on a slow moment of the shared machine:
    // this row tells such a moment from a change in the code.
    let per_event = |cpu_s: f64| 1e6 * cpu_s / records as f64;
    table.push_str(&format!(
        "| CPU per event in the processor's run, µs: processor + Redis (its AOF rewrites) | {:.1} + {:.1} ({:.1}) | |\n",
        per_event(proc_cpu),
        per_event(redis_main),
        per_event(redis_forks),
    ));
    table.push_str(&format!(
        "| Redis memory after the processor's run, bytes: per entity ({}); per remembered event id | {}; {:.0} | |\n",
        memory.per_entity.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" / "),
        memory.per_entity.iter().map(|(_, b)| format!("{b:.0}")).collect::<Vec<_>>().join(" / "),
        memory.per_marker,
    ));
    let pipeline_cpu = |m: &Measured| m.cpu_us.server + m.cpu_us.broker;
    table.push_str(&format!(
        "| ratios | ingest / seed-style {:.1} (CPU per request, server + Tansu: seed-style / ingest {:.1}), ingest / producer {:.2}, ingest / publish path alone {:.2}, ingest / bare axum {:.2}, processor / batch-1 {:.1} | |\n",
        seed_style.map_or(f64::NAN, |s| hooklog.rps / s.rps),
        seed_measured
            .as_ref()
            .map_or(f64::NAN, |m| pipeline_cpu(m) / pipeline_cpu(&hooklog_measured)),
        hooklog.rps / producer_rps,
        hooklog.rps / publish_rps,
        hooklog.rps / bare.rps,
        proc_rate / naive_rate
    ));
    println!("{table}");
    let per_round = |l: &Load| {
        l.rounds_rps
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let turns = format!(
        "Ingest and the seed-style receiver took turns (ingest, seed-style, ingest, …), so a slow moment of the shared machine falls on both; each load ran {} s after a {} s warm-up. Each turn's req/s: ingest {}; seed-style {}. CPU per request counts every request sent, warm-up included, and the seed-style receiver's gunicorn workers with it",
        duration.as_secs(),
        warmup.as_secs(),
        per_round(hooklog),
        seed_style.map_or("not run".into(), per_round),
    );
    println!("{turns}");
    // The smoke run, and bench/profile.sh (which stops the run midway),
    // leave the committed results alone.
    if smoke || std::env::var("BENCH_NO_WRITE").is_ok() {
        return;
    }
    let versions = versions(&stack.redis_url).await;
    let machine = format!(
        "{} cores, {} MiB memory, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m.lines().next().and_then(|l| l
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()))
            .unwrap_or(0)
            / 1024,
        String::from_utf8_lossy(
            &std::process::Command::new("rustc")
                .arg("--version")
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    );
    let mode = format!(
        "{} ({rounds} loads of {} s each for ingest and the seed-style receiver, in turns; {} records)",
        if quick { "BENCH_QUICK=1" } else { "full" },
        duration.as_secs(),
        thousands(records)
    );
    let doc = format!(
        "# Benchmarks\n\nWritten by `make bench` on {started_at}; mode: {mode}.\n\nMachine: {machine}. Broker: Tansu 0.6.0, memory storage (every reader starts at the beginning of the log), Redis (Debian) on loopback; release builds. Versions: {versions}.\n\nCommand: `make bench` (`BENCH_QUICK=1 make bench` for a short run).\n\n{table}\n{turns}.\n\nProcessor run: {diagnosis}. Rebuild: {rebuild_note}.\n\nThe seed-style receiver is `bench/seed_receiver.py` (the seed article's Flask receiver: verify `X-Webhook-Signature`, produce with confluent-kafka `acks=all`, wait for the delivery report, answer 200) under gunicorn with one sync worker per core, loaded exactly like ingest. Absolute figures on a shared 2-core machine are noisy; compare the ratios, measured side by side in one run. The load generator runs on the same 2 cores as everything it measures.\n"
    );
    // The analysis of the limits is kept by hand in bench/limits.md.
    let limits =
        std::fs::read_to_string(hooklog_e2e::root().join("bench/limits.md")).unwrap_or_default();
    std::fs::write(
        hooklog_e2e::root().join("docs/benchmarks.md"),
        format!("{doc}\n{limits}"),
    )
    .unwrap();
    let raw = json!({
        "date": started_at, "mode": mode, "machine": machine, "versions": versions,
        "ingest": {"rps": hooklog.rps, "rounds_rps": hooklog.rounds_rps, "cpu_us_per_request": cpu_json(&hooklog_measured), "p50_ms": hooklog.p50_ms, "p99_ms": hooklog.p99_ms, "p999_ms": hooklog.p999_ms, "non_2xx": hooklog.non_2xx, "peak_rss_kib": ingest_rss},
        "bare_axum_rps": bare.rps, "producer_msgs_per_s": producer_rps, "publish_alone_msgs_per_s": publish_rps,
        "publish_alone_by_in_flight": in_flight_rps.iter().map(|(n, r)| json!({"in_flight": n, "msgs_per_s": r})).collect::<Vec<_>>(),
        "seed_style": seed_measured.as_ref().map(|m| json!({"rps": m.load.rps, "rounds_rps": m.load.rounds_rps, "p50_ms": m.load.p50_ms, "p99_ms": m.load.p99_ms, "non_2xx": m.load.non_2xx, "cpu_us_per_request": cpu_json(m)})),
        "processor": {"events_per_s": proc_rate, "batch_size": batch_size, "batch1_events_per_s": naive_rate, "peak_rss_kib": proc_rss, "records": records, "cpu_s": proc_cpu, "redis_cpu_s": redis_main, "redis_fork_cpu_s": redis_forks},
        "redis_memory": {"bytes_per_entity": memory.per_entity.iter().map(|(p, b)| (p.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(), "bytes_per_event_id": memory.per_marker},
        "rebuild_events_per_s": rebuild_rate,
        "rebuild": {"replayed": replayed, "replay_s": replay_secs, "command_s": rebuild_wall},
    });
    let dir = hooklog_e2e::root().join("bench/results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{}.json", started_at.replace(':', "-"))),
        serde_json::to_string_pretty(&raw).unwrap(),
    )
    .unwrap();
}

/// The versions behind the figures: the kernel, Redis, Hooklog's librdkafka,
/// and the seed-style receiver's Python stack (from its venv, when it ran).
/// A namespace `name` of its own on `stack` (six partitions per raw topic,
/// `processor` added to `[processor]`), whose services run the binaries in
/// `target/<build>/`.
fn build_env(stack: &Stack, build: &str, name: &str, processor: &str) -> TestEnv {
    std::env::set_var("HOOKLOG_BIN_PROFILE", build);
    let env = TestEnv::on(
        name,
        &stack.brokers,
        &stack.redis_url,
        &format!("[processor]\npartitions = 6\n{processor}"),
    )
    .with_log("info");
    env.create_topics();
    env
}

/// `BENCH_COMPARE`: ingest, then the processor, of the builds in
/// `target/<build>/`, taking turns: ingest under the same load (req/s and
/// CPU per request), the processor on the same preloaded records (events/s
/// and its and Redis's CPU per event, then the rebuild of customers from
/// the same records), then each build's average.
async fn compare(builds: &[&str], turns: usize, records: usize, batch_size: usize) {
    let stack = Stack::start();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only != "processor" {
        let mut ingests = Vec::new();
        for (b, build) in builds.iter().enumerate() {
            let env = build_env(&stack, build, &format!("cmpi-{b}"), "");
            let server = env.ingest();
            ingests.push((env, server));
        }
        let targets: Vec<Target> = ingests
            .iter()
            .map(|(env, server)| Target {
                url: format!("{}/webhooks/fulfillment", env.ingest_url()),
                server,
                with_children: false,
            })
            .collect();
        let measured = side_by_side(
            &targets,
            stack.tansu.as_ref(),
            turns,
            Duration::from_secs(7),
            u64::MAX,
            Duration::from_secs(1),
        )
        .await;
        for (build, m) in builds.iter().zip(measured) {
            let turns: Vec<String> = m
                .load
                .rounds_rps
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect();
            println!(
                "ingest {build}: {:.0} req/s ({}), p99 {:.2} ms, non-2xx {}; CPU per request: ingest {:.1} µs, Tansu {:.1} µs",
                m.load.rps,
                turns.join(" / "),
                m.load.p99_ms,
                m.load.non_2xx,
                m.cpu_us.server,
                m.cpu_us.broker
            );
        }
    }
    if only == "ingest" {
        return;
    }
    let producer = kafka::producer(&stack.brokers);
    let preload = Preload::new(records, "c");
    let mut totals = vec![(0.0, 0.0, 0.0, 0.0); builds.len()];
    for turn in 0..turns {
        for (b, build) in builds.iter().enumerate() {
            let batch = format!("batch_size = {batch_size}");
            let env = build_env(&stack, build, &format!("cmp-{turn}-{b}"), &batch);
            preload.produce(&producer, &env).await;
            let redis_before = redis_cpu(&stack.redis_url).await;
            let processor = env.processor();
            let secs = preload
                .wait_applied(&env.processor_url(), Duration::from_secs(1800))
                .await
                .as_secs_f64();
            let cpu = processor.cpu_secs().unwrap_or(f64::NAN);
            let redis = redis_cpu(&stack.redis_url).await.0 - redis_before.0;
            drop(processor);
            let (ok, out) =
                env.processor_cmd(&["rebuild", "--projection", "customers", "--grace-secs", "0"]);
            assert!(ok, "rebuild failed: {out}");
            let (replayed, replay_secs) = replay_figures(&out).expect("rebuild reports its replay");
            // Each turn starts on an empty Redis (its cost grows with the keys).
            let client = redis::Client::open(stack.redis_url.as_str()).expect("redis url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            let _: () = redis::cmd("FLUSHALL")
                .query_async(&mut conn)
                .await
                .expect("FLUSHALL");
            let (rate, us, redis_us, rebuild) = (
                records as f64 / secs,
                1e6 * cpu / records as f64,
                1e6 * redis / records as f64,
                replayed / replay_secs,
            );
            println!("turn {turn} {build}: {rate:.0} events/s, CPU per event: processor {us:.1} µs, Redis {redis_us:.1} µs; rebuild {rebuild:.0} events/s");
            let t = &mut totals[b];
            (t.0, t.1, t.2, t.3) = (t.0 + rate, t.1 + us, t.2 + redis_us, t.3 + rebuild);
        }
    }
    for (build, (rate, us, redis_us, rebuild)) in builds.iter().zip(totals) {
        let n = turns as f64;
        println!(
            "{build}: on average {:.0} events/s, processor {:.1} µs and Redis {:.1} µs per event; rebuild {:.0} events/s",
            rate / n,
            us / n,
            redis_us / n,
            rebuild / n
        );
    }
}

async fn versions(redis_url: &str) -> String {
    let output = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let kernel = output("uname", &["-r"]).unwrap_or_else(|| "?".into());
    let redis = async {
        let client = redis::Client::open(redis_url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        hooklog_processor::projection::store::redis_version(&mut conn).await
    }
    .await
    .unwrap_or_else(|| "?".into());
    let librdkafka = rdkafka::util::get_rdkafka_version().1;
    let python = hooklog_e2e::root().join(".tools/bench-venv/bin/python");
    let seed = output(
        &python.display().to_string(),
        &[
            "-c",
            "import sys, importlib.metadata as m, confluent_kafka as c; \
             print(f'Python {sys.version.split()[0]}, Flask {m.version(\"flask\")}, \
             gunicorn {m.version(\"gunicorn\")}, confluent-kafka {m.version(\"confluent-kafka\")} \
             (librdkafka {c.libversion()[0]})')",
        ],
    )
    .unwrap_or_else(|| "not installed".into());
    format!(
        "Linux {kernel}; Redis {redis}; Hooklog's librdkafka {librdkafka}; seed-style receiver: {seed}"
    )
}

/// Redis's CPU seconds so far, from `INFO cpu`: its own process's, and its
/// forked children's (AOF rewrites).
async fn redis_cpu(url: &str) -> (f64, f64) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .expect("INFO cpu");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (
        field("used_cpu_user") + field("used_cpu_sys"),
        field("used_cpu_user_children") + field("used_cpu_sys_children"),
    )
}

/// What the processor's run left in Redis, for sizing it.
struct RedisMemory {
    /// Projection → bytes per entity (`MEMORY USAGE` of up to 10,000).
    per_entity: Vec<(&'static str, f64)>,
    /// Bytes per event id in the marker sets (all of them, whole).
    per_marker: f64,
}

/// Measures [`RedisMemory`] for version 1 of `projections` under `prefix`.
async fn redis_memory(url: &str, prefix: &str, projections: &[&'static str]) -> RedisMemory {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut per_entity = Vec::new();
    let (mut marker_bytes, mut markers) = (0u64, 0u64);
    for &p in projections {
        let entities = scan_keys(&mut conn, &format!("{prefix}{{{p}}}:v1:e:*"), 10_000).await;
        let mut pipe = redis::pipe();
        for k in &entities {
            pipe.cmd("MEMORY").arg("USAGE").arg(k);
        }
        let bytes: Vec<u64> = pipe.query_async(&mut conn).await.expect("MEMORY USAGE");
        per_entity.push((
            p,
            bytes.iter().sum::<u64>() as f64 / bytes.len().max(1) as f64,
        ));
        let buckets = scan_keys(&mut conn, &format!("{prefix}{{{p}}}:v1:seen:*"), usize::MAX).await;
        let mut pipe = redis::pipe();
        for k in &buckets {
            // SAMPLES 0: every member, not an estimate from five.
            pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            pipe.cmd("SCARD").arg(k);
        }
        let pairs: Vec<u64> = pipe.query_async(&mut conn).await.expect("marker sets");
        for pair in pairs.chunks_exact(2) {
            marker_bytes += pair[0];
            markers += pair[1];
        }
    }
    RedisMemory {
        per_entity,
        per_marker: marker_bytes as f64 / markers.max(1) as f64,
    }
}

/// Up to `limit` keys matching `pattern`.
async fn scan_keys(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
    limit: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 || keys.len() >= limit {
            keys.truncate(limit);
            return keys;
        }
        cursor = next;
    }
}

/// Records replayed and replay seconds from the rebuild command's summary
/// line (`... 141976 records replayed in 3.6 s ...`).
fn replay_figures(out: &str) -> Option<(f64, f64)> {
    let line = out.lines().find(|l| l.contains("records replayed in"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "replayed")?;
    let records = words.get(at.checked_sub(2)?)?.parse().ok()?;
    let secs: f64 = words.get(at + 2)?.parse().ok()?;
    Some((records, secs.max(0.05)))
}

/// A target's CPU per request for the JSON results.
fn cpu_json(m: &Measured) -> serde_json::Value {
    json!({"server": m.cpu_us.server, "tansu": m.cpu_us.broker, "load_generator": m.cpu_us.generator})
}

/// A number of records set in the environment variable `name`, if set.
fn records_from_env(name: &str) -> Option<usize> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} is a number of records, not {value:?}")),
    )
}

/// `1234567` → `1,234,567`.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

fn chrono_like_now() -> String {
    String::from_utf8_lossy(
        &std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preload_spreads_over_the_three_seed_projections() {
        let load = Preload::new(12, "t");
        let sizes: Vec<(&str, usize)> = load.records.iter().map(|(s, r)| (*s, r.len())).collect();
        assert_eq!(sizes, [("stripe", 4), ("fulfillment", 4), ("accounts", 4)]);
        assert_eq!(
            load.applies,
            [("charges", 4.0), ("orders", 4.0), ("customers", 8.0)]
        );
        let event_types: Vec<String> = load.records[1]
            .1
            .iter()
            .map(|(_, v)| {
                let view = hooklog_schemas::WebhookEvent::decode_view(v).unwrap();
                format!("{} {}", view.event_type, String::from_utf8_lossy(view.body))
            })
            .collect();
        // Each order is shipped, then delivered.
        assert!(event_types[0].starts_with("order.shipped") && event_types[0].contains("ORD-t-0"));
        assert!(
            event_types[1].starts_with("order.delivered") && event_types[1].contains("ORD-t-0")
        );
        assert!(event_types[2].starts_with("order.shipped") && event_types[2].contains("ORD-t-1"));
        // Orders are named by their body's hash, as ingest names the seed's.
        for (id, v) in &load.records[1].1 {
            let view = hooklog_schemas::WebhookEvent::decode_view(v).unwrap();
            assert_eq!(*id, hooklog_ingest::verify::body_hash_id(view.body));
            assert_eq!(view.event_id, id.as_str());
        }
        assert_eq!(event_time(0), "2025-03-01T00:00:00Z");
        assert_eq!(event_time(86_400 + 3_661), "2025-03-02T01:01:01Z");
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn reads_the_rebuild_summary() {
        let out = "progress\nrebuilt customers: version 2 is current (was 1), 141976 records replayed in 3.6 s (39438 records/s)\ndeleted version 1 (9 keys)\n";
        assert_eq!(super::replay_figures(out), Some((141976.0, 3.6)));
        assert_eq!(super::replay_figures("rebuilt x: 5 records replayed"), None);
    }
}
