//! An entity's stored hash as the document the read API serves and the
//! changelog publishes.

use serde_json::Value;

use crate::projection::fold;

/// One entity's state as served by the read API and the changelog.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityState {
    /// Projection name.
    pub projection: String,
    /// Entity key.
    pub key: String,
    /// Projection version the state comes from.
    pub version: u64,
    /// The entity's `~rev` (changes with every write; not published).
    pub rev: u64,
    /// The published JSON document: `projection`, `key`, `version`,
    /// `state` (the fields), `updated_at` (event time of the newest event
    /// applied, RFC 3339) and `last_event_id` (that event's id). Written
    /// straight from the stored hash (see [`entity_state`]).
    pub json: Vec<u8>,
}

impl EntityState {
    /// The document as a JSON value.
    pub fn document(&self) -> Value {
        serde_json::from_slice(&self.json).expect("entity_state writes JSON")
    }
}

/// `<15-digit ms>|<event id>`: compares like `(time, id)`.
pub fn clock(time_ms: i64, event_id: &str) -> String {
    format!("{:015}|{event_id}", time_ms.max(0))
}

/// The (field, value) pairs of a flat `HGETALL` reply.
pub(super) fn pairs(flat: &[String]) -> impl Iterator<Item = (&str, &str)> {
    flat.chunks_exact(2).map(|p| (p[0].as_str(), p[1].as_str()))
}

/// Builds an [`EntityState`] from an entity hash's (field, value) pairs.
///
/// The fields hold JSON text (the processor writes it with serde_json), and
/// the document copies that text as it is, in field-name order: parsing each
/// value into a `Value` and writing it out again was a sixth of the live
/// processor's time. A value that is not JSON (written by someone else) is
/// published as a JSON string.
pub fn entity_state<'a>(
    projection: &str,
    key: &str,
    version: u64,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> EntityState {
    let mut fields: Vec<(&str, &str)> = Vec::new();
    let mut updated = None;
    let mut rev = 0;
    for (f, v) in pairs {
        if f == "~updated" {
            updated = Some(v);
        } else if f == fold::REV {
            rev = v.parse().unwrap_or(0);
        } else if !f.starts_with('~') {
            fields.push((f, v));
        }
    }
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let (updated_at, last_event_id) = match updated.and_then(|u| u.split_once('|')) {
        Some((ms, id)) => {
            let at = ms
                .parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            (at, Some(id))
        }
        None => (None, None),
    };
    let size: usize = fields.iter().map(|(f, v)| f.len() + v.len() + 4).sum();
    let mut json = Vec::with_capacity(size + projection.len() + key.len() + 160);
    json.extend_from_slice(b"{\"projection\":");
    json_string(&mut json, projection);
    json.extend_from_slice(b",\"key\":");
    json_string(&mut json, key);
    json.extend_from_slice(format!(",\"version\":{version},\"state\":{{").as_bytes());
    for (i, (f, v)) in fields.into_iter().enumerate() {
        if i > 0 {
            json.push(b',');
        }
        json_string(&mut json, f);
        json.push(b':');
        match serde_json::from_str::<&serde_json::value::RawValue>(v) {
            Ok(raw) => json.extend_from_slice(raw.get().as_bytes()),
            Err(_) => json_string(&mut json, v),
        }
    }
    json.extend_from_slice(b"},\"updated_at\":");
    json_option(&mut json, updated_at.as_deref());
    json.extend_from_slice(b",\"last_event_id\":");
    json_option(&mut json, last_event_id);
    json.push(b'}');
    EntityState {
        projection: projection.into(),
        key: key.into(),
        version,
        rev,
        json,
    }
}

/// Appends `s` as a JSON string.
fn json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("a string serializes into a Vec");
}

/// Appends `s` as a JSON string, or `null`.
fn json_option(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_order_by_time_then_id() {
        assert!(clock(2, "a") > clock(1, "z"));
        assert!(clock(1, "b") > clock(1, "a"));
        assert!(clock(10, "a") > clock(9, "a"));
    }

    #[test]
    fn builds_state_from_flat_reply() {
        let flat = [
            "carrier",
            "\"FedEx\"",
            "~c:carrier",
            "x",
            "total",
            "12.5",
            "~updated",
            "001740830400000|e1",
        ];
        let flat: Vec<String> = flat.iter().map(|s| s.to_string()).collect();
        let s = entity_state("orders", "ORD-1", 3, pairs(&flat));
        assert_eq!(
            s.document(),
            serde_json::json!({
                "projection": "orders",
                "key": "ORD-1",
                "version": 3,
                "state": {"carrier": "FedEx", "total": 12.5},
                "updated_at": "2025-03-01T12:00:00.000Z",
                "last_event_id": "e1",
            })
        );
        assert_eq!(s.rev, 0);
        // Fields in name order, numbers as written.
        let text = String::from_utf8(s.json).unwrap();
        assert!(
            text.contains(r#""state":{"carrier":"FedEx","total":12.5}"#),
            "{text}"
        );
    }

    /// The document as the processor built it before it copied field text:
    /// every value parsed into a `Value`, text that is not JSON a string.
    fn document_via_values(projection: &str, key: &str, version: u64, flat: &[String]) -> Value {
        let mut state = serde_json::Map::new();
        for (f, v) in pairs(flat).filter(|(f, _)| !f.starts_with('~')) {
            let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
            state.insert(f.to_owned(), value);
        }
        let s = entity_state(projection, key, version, pairs(flat));
        let d = s.document();
        serde_json::json!({
            "projection": projection, "key": key, "version": version, "state": state,
            "updated_at": d["updated_at"], "last_event_id": d["last_event_id"],
        })
    }

    #[test]
    fn copied_field_text_reads_as_the_parsed_values_would() {
        let values = [
            r#""plain""#,
            r#""quote \" and \\ and \u00e9 and é""#,
            "12345678901234567890123456789.000001",
            "-0.5e-3",
            "true",
            "null",
            r#"{"b":[1,{"c":null}],"a":"x"}"#,
            "[]",
            "not json",
            "",
            " 7 ",
            "{\"unterminated\"",
        ];
        for (i, v) in values.iter().enumerate() {
            let flat: Vec<String> = [
                ("z_last", "1"),
                (&format!("f{i}") as &str, v),
                ("~rev", "4"),
                ("~r:f", "2"),
                ("a \"first\"", "\"k\""),
                ("~updated", "000000000000005|evt \"1\""),
            ]
            .iter()
            .flat_map(|(f, v)| [f.to_string(), v.to_string()])
            .collect();
            let s = entity_state("p\"q", "key/\u{1}", 9, pairs(&flat));
            assert_eq!(s.rev, 4);
            assert_eq!(
                s.document(),
                document_via_values("p\"q", "key/\u{1}", 9, &flat),
                "{v}"
            );
            assert_eq!(s.document()["last_event_id"], "evt \"1\"");
            assert_eq!(s.document()["updated_at"], "1970-01-01T00:00:00.005Z");
        }
    }

    #[test]
    fn a_state_without_clock_has_null_times() {
        let flat = vec!["n".to_string(), "1".to_string()];
        let d = entity_state("p", "k", 1, pairs(&flat)).document();
        assert_eq!(d["updated_at"], Value::Null);
        assert_eq!(d["last_event_id"], Value::Null);
        assert_eq!(d["state"], serde_json::json!({"n": 1}));
    }
}
