//! Property: the real Lua apply script on a real Redis is order-insensitive
//! and idempotent. Random events for one entity, delivered in two different
//! shuffled orders with duplicates, give identical state; `sum` equals the
//! sum over distinct event ids. Applying one event per call and a whole
//! delivery in one call give the same state too.

use hooklog_e2e::{events, shared_stack, unique};
use hooklog_processor::projection::spec::{ProjectionSpec, Update};
use hooklog_processor::projection::store::{stripe_of, Applied, Store, Target};
use hooklog_schemas::WebhookEvent;
use proptest::prelude::*;
use redis::AsyncCommands;

const SPEC: &str = r#"
name = "orders"
status_field = "status"
status_precedence = ["created", "paid", "shipped", "delivered"]
[[rule]]
event_type = "order.*"
key = "/order_id"
time = "/at"
set = { carrier = "/carrier", note = "/note" }
sum = { total = "/amount" }
count = ["events"]
"#;

#[derive(Clone, Debug)]
struct Ev {
    status: usize,
    at: i64,
    carrier: String,
    note: Option<String>,
    amount: i64,
}

fn ev_strategy() -> impl Strategy<Value = Ev> {
    (
        0usize..4,
        0i64..5,
        "[A-C]",
        proptest::option::of("[x-z]{1,2}"),
        -500i64..5000,
    )
        .prop_map(|(status, at, carrier, note, amount)| Ev {
            status,
            at: 1_740_000_000 + at,
            carrier,
            note,
            amount,
        })
}

fn spec_with_status(status: usize) -> ProjectionSpec {
    let mut spec: ProjectionSpec = toml::from_str(SPEC).unwrap();
    spec.rules[0].status = Some(spec.status_precedence[status].clone());
    spec
}

async fn apply_all(store: &Store, events: &[(usize, Ev)], batch: usize) -> serde_json::Value {
    for chunk in events.chunks(batch) {
        let mut updates = Vec::new();
        for (id, e) in chunk {
            let mut body = serde_json::json!({"order_id": "ORD-P", "at": e.at, "carrier": e.carrier, "amount": e.amount});
            if let Some(n) = &e.note {
                body["note"] = n.clone().into();
            }
            let event = order_event(*id, &body);
            let spec = spec_with_status(e.status);
            let update = spec
                .map(&spec.rules[0], &event.view(), Some(&body))
                .unwrap();
            updates.push((update, event.event_id));
        }
        apply_live(store, &updates).await;
    }
    let s = store.read("orders", "ORD-P", None).await.unwrap().unwrap();
    let d = s.document();
    serde_json::json!({"state": d["state"], "updated_at": d["updated_at"], "last_event_id": d["last_event_id"]})
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_order_any_duplicates_same_state(
        events in proptest::collection::vec(ev_strategy(), 1..12),
        dup_picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
        seed_a in any::<u64>(),
        seed_b in any::<u64>(),
    ) {
        let indexed: Vec<(usize, Ev)> = events.iter().cloned().enumerate().collect();
        let mut delivery: Vec<(usize, Ev)> = indexed.clone();
        for pick in &dup_picks {
            delivery.push(indexed[pick.index(indexed.len())].clone());
        }
        let shuffle = |seed: u64| {
            let mut v = delivery.clone();
            let mut x = seed | 1;
            for i in (1..v.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                v.swap(i, (x % (i as u64 + 1)) as usize);
            }
            v
        };
        let (a, b) = (shuffle(seed_a), shuffle(seed_b));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let url = shared_stack().redis_url.clone();
        let (state_a, state_b) = rt.block_on(async {
            let sa = Store::connect(&url, &unique("e2e:prop:"), 600).await.unwrap();
            let sb = Store::connect(&url, &unique("e2e:prop:"), 600).await.unwrap();
            // One event per call against the whole delivery in one call: the
            // script's per-chunk fold must equal applying one by one.
            (apply_all(&sa, &a, 1).await, apply_all(&sb, &b, usize::MAX).await)
        });
        prop_assert_eq!(&state_a, &state_b);
        let total: i64 = events.iter().map(|e| e.amount).sum();
        prop_assert_eq!(state_a["state"]["total"].as_f64(), Some(total as f64));
        prop_assert_eq!(state_a["state"]["events"].as_i64(), Some(events.len() as i64));
        let top = events.iter().map(|e| e.status).max().unwrap();
        let expected_status = ["created", "paid", "shipped", "delivered"][top];
        prop_assert_eq!(state_a["state"]["status"].as_str(), Some(expected_status));
    }
}

/// A batch larger than one script call (500 updates) with duplicates across
/// the chunk boundary: each distinct event counts once, every update gets its
/// own verdict, and the state comes back for the entity's last update. The
/// same through the watched transaction and through the script.
#[tokio::test]
async fn a_batch_spanning_several_script_calls_applies_each_event_once() {
    for scripted in [false, true] {
        let store = Store::connect(&shared_stack().redis_url, &unique("e2e:chunk:"), 600)
            .await
            .unwrap();
        let store = if scripted {
            store.scripted_only()
        } else {
            store
        };
        one_entity_batch_with_redeliveries(&store).await;
    }
}

async fn one_entity_batch_with_redeliveries(store: &Store) {
    let spec = spec_with_status(1);
    // 1,100 updates: events 0..1000, then 0..100 again (redeliveries).
    let updates = order_updates(&spec, "ORD-C", (0..1000).chain(0..100));
    let results = apply_live(store, &updates).await;
    assert_eq!(results.len(), 1100);
    assert!(results[..1000].iter().all(|r| r.applied));
    assert!(results[1000..].iter().all(|r| !r.applied));
    let with_state: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].state.is_some())
        .collect();
    assert_eq!(
        with_state,
        vec![1099],
        "state only for the entity's last update"
    );
    let s = store.read("orders", "ORD-C", None).await.unwrap().unwrap();
    let d = s.document();
    assert_eq!(d["state"]["events"].as_i64(), Some(1000));
    assert_eq!(d["state"]["total"].as_f64(), Some(2000.0));
    assert_eq!(d["last_event_id"].as_str(), Some("evt-999"));
    assert_eq!(results[1099].state.as_ref(), Some(&s));
    // Either way the write bumped the entity's stripe counter, once: what
    // a watched commit that read the entity before would see.
    let stripe = format!(
        "{}:stripe:{}",
        store.version_prefix("orders", 1),
        stripe_of("ORD-C")
    );
    let bumps: Option<u64> = redis::cmd("GET")
        .arg(&stripe)
        .query_async(&mut store.connection())
        .await
        .unwrap();
    assert_eq!(bumps, Some(1), "{stripe}");
}

/// A large batch over many entities is applied in concurrent shards: every
/// update keeps its own verdict in batch order, each entity's last update
/// carries its state, and the states equal applying the same events one
/// entity at a time (through the script, the batch through watched
/// transactions).
#[tokio::test]
async fn a_sharded_batch_matches_applying_entity_by_entity() {
    let spec = spec_with_status(2);
    let mut updates = Vec::new();
    for round in 0..20 {
        for order in 0..60 {
            let id = round * 60 + order;
            updates.extend(order_updates(
                &spec,
                &format!("ORD-S{order}"),
                std::iter::once(id),
            ));
        }
    }
    // Redeliveries of the first 100 events at the end of the batch.
    let again: Vec<_> = updates[..100].to_vec();
    updates.extend(again);
    let url = shared_stack().redis_url.clone();
    let sharded = Store::connect(&url, &unique("e2e:shard:"), 600)
        .await
        .unwrap();
    let refs: Vec<_> = updates.iter().map(|(u, id)| (u, id.as_str())).collect();
    let results = sharded.apply_batch(&refs, Target::Live).await.unwrap();
    assert_eq!(results.len(), 1300);
    assert!(results[..1200].iter().all(|r| r.applied));
    assert!(results[1200..].iter().all(|r| !r.applied));
    let one_by_one = Store::connect(&url, &unique("e2e:shard:"), 600)
        .await
        .unwrap()
        .scripted_only();
    for order in 0..60 {
        let key = format!("ORD-S{order}");
        // The entity's last update in the batch carries its state.
        let last = (0..refs.len())
            .rev()
            .find(|&i| refs[i].0.key == key)
            .unwrap();
        let mine: Vec<_> = refs.iter().filter(|r| r.0.key == key).copied().collect();
        for r in &mine {
            one_by_one.apply_batch(&[*r], Target::Live).await.unwrap();
        }
        let got = sharded.read("orders", &key, None).await.unwrap().unwrap();
        let want = one_by_one
            .read("orders", &key, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.document()["state"], want.document()["state"], "{key}");
        assert_eq!(
            got.document()["state"]["events"].as_i64(),
            Some(20),
            "{key}"
        );
        assert_eq!(results[last].state.as_ref(), Some(&got), "{key}");
        for i in (0..refs.len()).filter(|&i| refs[i].0.key == key && i != last) {
            assert!(
                results[i].state.is_none(),
                "{key}: only the last update has state"
            );
        }
    }
}

/// Markers outlive a change of `dedup_window_secs` (which changes the bucket
/// width): redeliveries after a restart with a new window still count once.
/// The buckets expire, a window and at most one bucket width from now, and
/// one entity's 2,500 new events in one call are all remembered.
#[tokio::test]
async fn markers_survive_a_window_change_and_expire_with_their_bucket() {
    // Through the watched transaction, and through the script.
    for scripted in [false, true] {
        markers_across_a_window_change(scripted).await;
    }
}

async fn markers_across_a_window_change(scripted: bool) {
    let prefix = unique("e2e:window:");
    let url = shared_stack().redis_url.clone();
    let spec = spec_with_status(1);
    let connect = |window| {
        let (url, prefix) = (url.clone(), prefix.clone());
        async move {
            let store = Store::connect(&url, &prefix, window).await.unwrap();
            if scripted {
                store.scripted_only()
            } else {
                store
            }
        }
    };
    let first = connect(600).await;
    let updates = order_updates(&spec, "ORD-W", 0..2500);
    let results = apply_live(&first, &updates).await;
    assert!(results.iter().all(|r| r.applied));

    let second = connect(7 * 86_400).await;
    let again = order_updates(&spec, "ORD-W", (0..2500).step_by(7).chain(2500..2510));
    let results = apply_live(&second, &again).await;
    let applied = results.iter().filter(|r| r.applied).count();
    assert_eq!(applied, 10, "only the 10 new ids apply");
    let s = second.read("orders", "ORD-W", None).await.unwrap().unwrap();
    assert_eq!(s.document()["state"]["events"].as_i64(), Some(2510));

    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let index = format!("{prefix}{{orders}}:v1:seen");
    let buckets: Vec<String> = redis::cmd("ZRANGE")
        .arg(&index)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!buckets.is_empty() && buckets.len() <= 2, "{buckets:?}");
    let mut members = 0;
    for b in &buckets {
        let ttl: i64 = redis::cmd("TTL")
            .arg(b)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            (600..=7 * 86_400 + 7 * 86_400 / 8 + 1).contains(&ttl),
            "{b}: {ttl}"
        );
        let n: usize = redis::cmd("SCARD")
            .arg(b)
            .query_async(&mut conn)
            .await
            .unwrap();
        members += n;
    }
    assert_eq!(members, 2510, "one marker per distinct event");
}

/// Four writers hammer one entity at once (as replicas sharing a customer
/// do): every lost compare-and-set is re-read and folded again, so each
/// distinct event counts exactly once. The watched commits (the first try
/// of each apply) lose to each other and to the script's writes, which
/// retry them: both ways of writing meet on one entity here.
#[tokio::test]
async fn concurrent_writers_on_one_entity_count_each_event_once() {
    let prefix = unique("e2e:race:");
    let url = shared_stack().redis_url.clone();
    let spec = spec_with_status(1);
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (url, prefix, spec) = (url.clone(), prefix.clone(), spec.clone());
        tasks.push(tokio::spawn(async move {
            let store = Store::connect(&url, &prefix, 600).await.unwrap();
            for b in 0..40 {
                // Writers overlap: writer w sends ids w*200.. and every batch
                // repeats one id of the previous writer's range.
                let start = w * 200 + b * 5;
                let ids = (start..start + 5).chain(std::iter::once((start + 200) % 800));
                let updates = order_updates(&spec, "ORD-R", ids);
                apply_live(&store, &updates).await;
            }
            store.lost_watches()
        }));
    }
    let mut lost = 0;
    for t in tasks {
        lost += t.await.unwrap();
    }
    assert!(
        lost > 0,
        "no watched commit lost a race: the test raced nothing"
    );
    let store = Store::connect(&url, &prefix, 600).await.unwrap();
    let s = store.read("orders", "ORD-R", None).await.unwrap().unwrap();
    let d = s.document();
    assert_eq!(d["state"]["events"].as_i64(), Some(800));
    assert_eq!(d["state"]["total"].as_f64(), Some(1600.0));
}

/// The write counters let the publish stage skip re-reading what it
/// published: after a batch's read, only our own later writes leave the
/// projection "written only by us"; one write by another store does not.
#[tokio::test]
async fn write_counters_tell_our_later_writes_from_another_writers() {
    let prefix = unique("e2e:counts:");
    let url = shared_stack().redis_url.clone();
    let spec = spec_with_status(1);
    let ours = Store::connect(&url, &prefix, 600).await.unwrap();
    let theirs = Store::connect(&url, &prefix, 600).await.unwrap();
    let apply = |store, ids, order| {
        let updates = order_updates(&spec, order, ids);
        async move { apply_live(store, &updates).await }
    };
    let first = apply(&ours, 0..3, "ORD-A").await;
    let since = first[0].since;
    assert!(
        first.iter().all(|a| a.since == since),
        "one read, one snapshot"
    );
    let read_at = [("orders", since)];
    let quiet = || ours.written_only_by_us_since(&read_at);
    assert_eq!(quiet().await.unwrap(), vec![Some(1)], "nothing since");
    apply(&ours, 3..6, "ORD-B").await;
    assert_eq!(quiet().await.unwrap(), vec![Some(1)], "our own later batch");
    apply(&theirs, 6..9, "ORD-C").await;
    assert_eq!(quiet().await.unwrap(), vec![None], "another writer's batch");
    // Seen from the other store, our first batch was someone else's.
    let their_read = apply(&theirs, 9..10, "ORD-C").await[0].since;
    assert_eq!(
        theirs
            .written_only_by_us_since(&[("orders", their_read)])
            .await
            .unwrap(),
        vec![Some(1)]
    );
    apply(&ours, 10..11, "ORD-A").await;
    assert_eq!(
        theirs
            .written_only_by_us_since(&[("orders", their_read)])
            .await
            .unwrap(),
        vec![None]
    );
}

/// Events of entities a version does not have skip the marker lookup; a
/// redelivery, once their entities exist, is still recognised, whether the
/// events arrive alone or together with new ones.
#[tokio::test]
async fn redeliveries_of_events_that_created_their_entities_apply_nothing() {
    let prefix = unique("e2e:new:");
    let url = shared_stack().redis_url.clone();
    let spec = spec_with_status(1);
    let store = Store::connect(&url, &prefix, 600).await.unwrap();
    let mut updates = Vec::new();
    for order in 0..20 {
        updates.extend(order_updates(
            &spec,
            &format!("ORD-N{order}"),
            order..order + 1,
        ));
    }
    let first = apply_live(&store, &updates).await;
    assert!(first.iter().all(|a| a.applied), "all new");
    let again = apply_live(&store, &updates).await;
    assert!(again.iter().all(|a| !a.applied), "all redelivered");
    // Mixed with events of a new entity in one batch.
    let mut mixed = updates[..5].to_vec();
    mixed.extend(order_updates(&spec, "ORD-N99", 99..100));
    let mixed = apply_live(&store, &mixed).await;
    assert!(mixed[..5].iter().all(|a| !a.applied));
    assert!(mixed[5].applied);
    let s = store.read("orders", "ORD-N3", None).await.unwrap().unwrap();
    assert_eq!(s.document()["state"]["events"].as_i64(), Some(1));
}

/// Applies updates (with their event ids) to the live version in one batch.
async fn apply_live(store: &Store, updates: &[(Update, String)]) -> Vec<Applied> {
    let refs: Vec<_> = updates.iter().map(|(u, id)| (u, id.as_str())).collect();
    store.apply_batch(&refs, Target::Live).await.unwrap()
}

/// Updates of one order entity for the given event ids (amount 2 each).
fn order_updates(
    spec: &ProjectionSpec,
    order: &str,
    ids: impl Iterator<Item = usize>,
) -> Vec<(Update, String)> {
    let mut updates = Vec::new();
    for id in ids {
        let body = serde_json::json!({"order_id": order, "at": 1_740_000_000 + id, "carrier": "A", "amount": 2});
        let event = order_event(id, &body);
        let update = spec
            .map(&spec.rules[0], &event.view(), Some(&body))
            .unwrap();
        updates.push((update, event.event_id));
    }
    updates
}

/// An `order.updated` event `evt-<id>` with this body.
fn order_event(id: usize, body: &serde_json::Value) -> WebhookEvent {
    events::raw(
        "s",
        "hmac-sha256",
        &format!("evt-{id}"),
        "order.updated",
        &body.to_string(),
    )
}

/// A rebuild writes into its version only while `building` names it. Once
/// the pointer is removed (a failed rebuild's clean-up, an operator) or
/// names another version, an apply into the version fails with
/// NOTBUILDING and writes nothing, on the watched path and the script's
/// alike; after the clean-up deleted the version, such an apply leaves no
/// key of it behind.
#[tokio::test]
async fn a_rebuild_writes_into_its_version_only_while_it_is_being_built() {
    let url = shared_stack().redis_url.clone();
    let spec = spec_with_status(1);
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for scripted in [false, true] {
        let prefix = unique("e2e:fence:");
        let mut store = Store::connect(&url, &prefix, 600).await.unwrap();
        if scripted {
            store = store.scripted_only();
        }
        let building = store.building_key("orders");
        let apply = |order: &str, id: usize| {
            let updates = order_updates(&spec, order, id..id + 1);
            let store = &store;
            async move {
                let refs: Vec<_> = updates.iter().map(|(u, id)| (u, id.as_str())).collect();
                store.apply_batch(&refs, Target::Version(2)).await
            }
        };
        let exists = |order: &'static str| {
            let store = &store;
            async move { store.read_in_version("orders", &[order], 2).await.unwrap()[0].is_some() }
        };
        let _: () = redis.set(&building, 2).await.unwrap();
        let ok = apply("ORD-F1", 1).await.unwrap();
        assert!(ok[0].applied, "scripted={scripted}");
        assert!(exists("ORD-F1").await);

        for pointer in [None, Some(3)] {
            let _: () = match pointer {
                None => redis.del(&building).await.unwrap(),
                Some(v) => redis.set(&building, v).await.unwrap(),
            };
            let refused = apply("ORD-F2", 2).await.unwrap_err();
            assert_eq!(
                refused.code(),
                Some(hooklog_processor::projection::store::NOT_BUILDING),
                "scripted={scripted}, building={pointer:?}: {refused}"
            );
            assert!(!exists("ORD-F2").await, "scripted={scripted}");
        }

        let _: () = redis.del(&building).await.unwrap();
        hooklog_processor::rebuild::delete_version(&store, "orders", 2)
            .await
            .unwrap();
        apply("ORD-F3", 3).await.unwrap_err();
        let left: Vec<String> = redis
            .keys(format!("{}:*", store.version_prefix("orders", 2)))
            .await
            .unwrap();
        assert!(left.is_empty(), "scripted={scripted}: left {left:?}");
    }
}

/// The same refusal inside `lua/commit.lua` itself, for a write whose read
/// saw the pointer just before it moved: called as a rebuild's apply
/// (ARGV[3] empty), it writes only while `building` names its version;
/// `lua/markers.lua`, next in the same transaction, then indexes no bucket.
#[tokio::test]
async fn commit_script_refuses_a_rebuild_write_into_a_version_no_longer_built() {
    let url = shared_stack().redis_url.clone();
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let p = unique("e2e:fencelua:");
    let (building, entity, bucket, index) = (
        format!("{p}building"),
        format!("{p}v2:e:ORD-L"),
        format!("{p}v2:seen:100"),
        format!("{p}v2:seen"),
    );
    let commit = redis::Script::new(include_str!("../../processor/lua/commit.lua"));
    let markers = redis::Script::new(include_str!("../../processor/lua/markers.lua"));
    let write = |redis: &mut redis::aio::MultiplexedConnection| {
        let mut call = commit.prepare_invoke();
        call.arg(format!("{p}current"))
            .arg(&building)
            .arg("")
            .arg(2)
            .arg("")
            .arg(format!("{p}writes"))
            .arg(format!("{p}own"))
            .arg(1)
            .arg(&bucket)
            .arg(format!("{p}v2:stripe:"))
            .arg(&entity)
            .arg("0")
            .arg(1)
            .arg(0)
            .arg(1)
            .arg("evt_1")
            .arg(2)
            .arg("status")
            .arg("\"shipped\"")
            .arg("~rev")
            .arg(1);
        let mut redis = redis.clone();
        async move { call.invoke_async::<redis::Value>(&mut redis).await.unwrap() }
    };
    let keep = |redis: &mut redis::aio::MultiplexedConnection| {
        let mut call = markers.prepare_invoke();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        call.arg(&bucket).arg(&index).arg(now).arg(now + 3600);
        let mut redis = redis.clone();
        async move { call.invoke_async::<i64>(&mut redis).await.unwrap() }
    };

    assert_eq!(write(&mut redis).await, redis::Value::Int(-1), "no pointer");
    keep(&mut redis).await;
    let _: () = redis.set(&building, 3).await.unwrap();
    assert_eq!(
        write(&mut redis).await,
        redis::Value::Int(-1),
        "another version"
    );
    keep(&mut redis).await;
    for key in [&entity, &bucket, &index] {
        let exists: bool = redis.exists(key).await.unwrap();
        assert!(!exists, "{key} was written");
    }

    let _: () = redis.set(&building, 2).await.unwrap();
    assert_eq!(
        write(&mut redis).await,
        redis::Value::Array(vec![redis::Value::Int(0)]),
        "its own version"
    );
    keep(&mut redis).await;
    for key in [&entity, &bucket, &index] {
        let exists: bool = redis.exists(key).await.unwrap();
        assert!(exists, "{key} was not written");
    }
}
