//! Turns a batch of raw records into projection updates and dead letters.
//! Pure: shared by the live consumer and the rebuild.

use std::cell::OnceCell;

use hooklog_schemas::WebhookEvent;
use rdkafka::message::{Headers, Message};
use serde_json::Value;

use crate::projection::pointer::Paths;
use crate::projection::spec::{ProjectionSpec, Update};

/// An owned raw record.
#[derive(Clone, Debug)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    /// Copies a consumed message (once: `detach()` and then converting the
    /// owned message would copy every payload twice). Its headers only when
    /// `with_headers`: they are most of the copy's cost, and a rebuild
    /// reads them only to link trace spans.
    pub fn copy_of<M: Message>(m: &M, with_headers: bool) -> Self {
        // `with_headers` is checked first: asking for the headers parses them.
        let headers = with_headers
            .then(|| m.headers())
            .flatten()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The bytes the record holds: its key, value and headers (what a
    /// batch's byte limit counts).
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// The default byte limit of a batch (`processor.batch_max_bytes`): 16 MiB,
/// above the 10,000 records of ~1 KB that a catch-up batch holds at most
/// in our benchmarks, so it only cuts batches of large records.
pub const DEFAULT_MAX_BYTES: usize = 16 * 1024 * 1024;

/// When a batch being filled is full: at `records` records, or once its
/// records hold `bytes` bytes (see [`Record::size`]). The byte limit keeps
/// the memory of the batches in flight bounded when records are large (a
/// 1 MiB webhook body times 500 records is half a gigabyte); a batch may go
/// past it by its last record, and always holds at least one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimit {
    /// Records per batch.
    pub records: usize,
    /// Bytes per batch.
    pub bytes: usize,
}

/// A batch being filled: its records and their bytes, until its
/// [`BatchLimit`] says it is full.
pub struct Filling {
    limit: BatchLimit,
    records: Vec<Record>,
    bytes: usize,
}

impl Filling {
    /// A batch of `first`.
    pub fn new(limit: BatchLimit, first: Record) -> Self {
        let mut batch = Self {
            limit,
            records: Vec::new(),
            bytes: 0,
        };
        batch.push(first);
        batch
    }

    /// Adds a record.
    pub fn push(&mut self, record: Record) {
        self.bytes += record.size();
        self.records.push(record);
    }

    /// True when the batch takes no more.
    pub fn is_full(&self) -> bool {
        self.records.len() >= self.limit.records || self.bytes >= self.limit.bytes
    }

    /// The records, in the order pushed.
    pub fn into_records(self) -> Vec<Record> {
        self.records
    }
}

/// What a batch asks of Redis, and what cannot be processed.
#[derive(Debug, Default)]
pub struct Plan {
    /// Updates with their event ids and the index of their record.
    pub updates: Vec<(Update, String, usize)>,
    /// Poison records (index, bounded reason label, detail).
    pub poison: Vec<(usize, &'static str, String)>,
    /// Events no rule matched.
    pub unmatched: usize,
}

/// Plans a batch against the projections (all of them, or one for a rebuild).
pub fn plan<'a>(
    projections: impl Iterator<Item = &'a ProjectionSpec> + Clone,
    records: &[Record],
) -> Plan {
    let mut plan = Plan::default();
    let mut paths = Paths::default();
    for spec in projections.clone() {
        spec.add_pointers(&mut paths);
    }
    for (i, r) in records.iter().enumerate() {
        let event = match r.payload.as_deref().map(WebhookEvent::decode_view) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                plan.poison.push((i, "undecodable", e.to_string()));
                continue;
            }
            None => {
                plan.poison
                    .push((i, "undecodable", "record has no value".into()));
                continue;
            }
        };
        // The body is parsed only when a rule matches (most records of a
        // rebuild's replay, of every raw topic, match none), and only what
        // the rules point at is kept.
        let doc: OnceCell<Option<Value>> = OnceCell::new();
        let mut matched = false;
        let mut failure = None;
        let mut updates = Vec::new();
        for spec in projections.clone() {
            // One update per projection and event: the first matching rule
            // (in file order) that can map it. A projection remembers an
            // event id once, so a second update of the same event would
            // apply or not depending on how the batch happened to be split.
            for rule in spec.matching(event) {
                matched = true;
                let doc = doc.get_or_init(|| paths.parse(event.body));
                match spec.map(rule, &event, doc.as_ref()) {
                    Ok(u) => {
                        updates.push(u);
                        break;
                    }
                    Err(e) => failure = Some(format!("projection {}: {e}", spec.name)),
                }
            }
        }
        // Dead-letter only what no projection can map: a rule whose entity
        // key is absent (e.g. a guest charge in a per-customer projection)
        // must not hold back the projections that can use the event.
        if let (true, Some(detail)) = (updates.is_empty(), failure) {
            plan.poison.push((i, "unmappable", detail));
        } else if !matched {
            plan.unmatched += 1;
        } else {
            plan.updates.extend(
                updates
                    .into_iter()
                    .map(|u| (u, event.event_id.to_owned(), i)),
            );
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_id: &str, body: &str) -> Record {
        let event = crate::test_support::event(event_id, "transfer.done", body, 42);
        Record {
            topic: "webhooks.raw.fulfillment".into(),
            partition: 0,
            offset: 0,
            key: Some(event_id.as_bytes().to_vec()),
            payload: Some(event.encode()),
            headers: Vec::new(),
        }
    }

    #[test]
    fn each_projection_takes_the_first_matching_rule_that_maps_the_event() {
        let spec: ProjectionSpec = toml::from_str(
            r#"
            name = "accounts"
            [[rule]]
            event_type = "transfer.*"
            key = "/from"
            count = ["sent"]
            [[rule]]
            event_type = "transfer.done"
            key = "/to"
            count = ["received"]
        "#,
        )
        .unwrap();
        spec.validate().unwrap();
        let batch = [
            record("t1", r#"{"from":"A","to":"B"}"#),
            // The first rule's key is missing: the second rule maps it.
            record("t2", r#"{"to":"C"}"#),
            // No rule can map it: a dead letter.
            record("t3", r#"{}"#),
        ];
        let plan = plan(std::iter::once(&spec), &batch);
        let keys: Vec<(&str, &str)> = plan
            .updates
            .iter()
            .map(|(u, id, _)| (u.key.as_str(), id.as_str()))
            .collect();
        assert_eq!(keys, [("A", "t1"), ("C", "t2")]);
        assert_eq!(plan.poison.len(), 1);
        assert_eq!(plan.poison[0].0, 2);
        assert_eq!(plan.unmatched, 0);
    }

    #[test]
    fn a_record_counts_its_key_value_and_headers() {
        let r = Record {
            topic: "a-long-topic-name-that-is-not-counted".into(),
            partition: 3,
            offset: 7,
            key: Some(b"key".to_vec()),
            payload: Some(vec![0; 1000]),
            headers: vec![("h".into(), b"12345".to_vec())],
        };
        assert_eq!(r.size(), 3 + 1000 + 1 + 5);
        let empty = Record {
            key: None,
            payload: None,
            headers: Vec::new(),
            ..r
        };
        assert_eq!(empty.size(), 0);
    }

    fn sized(bytes: usize) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(vec![0; bytes]),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_batch_is_full_at_its_record_count_or_its_bytes() {
        let limit = BatchLimit {
            records: 500,
            bytes: 64 * 1024,
        };
        // By count: 499 small records leave room, the 500th fills it.
        let mut batch = Filling::new(limit, sized(10));
        for _ in 1..499 {
            batch.push(sized(10));
        }
        assert!(!batch.is_full());
        batch.push(sized(10));
        assert!(batch.is_full());
        // By bytes: one byte short leaves room, reaching the limit fills it.
        let mut batch = Filling::new(limit, sized(1_000));
        assert!(!batch.is_full());
        batch.push(sized(64 * 1024 - 1_001));
        assert!(!batch.is_full());
        batch.push(sized(1));
        assert!(batch.is_full());
        assert_eq!(batch.into_records().len(), 3);
        // A record larger than the limit makes a batch of its own.
        assert!(Filling::new(limit, sized(1 << 20)).is_full());
    }
}
