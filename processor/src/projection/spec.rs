//! `[[projection]]` definitions and the mapping of one event to an update.

use std::collections::BTreeMap;

use hooklog_schemas::EventView;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::pointer::{lookup, Paths};

/// One projection, as declared in `hooklog.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSpec {
    /// Name: `GET /v1/projections/<name>/<key>`, topic `hooklog.state.<name>`.
    pub name: String,
    /// The field that holds the status, when rules set one.
    #[serde(default)]
    pub status_field: Option<String>,
    /// Status values, lowest first: a status only moves forward.
    #[serde(default)]
    pub status_precedence: Vec<String>,
    /// Which events feed the projection and how.
    #[serde(rename = "rule")]
    pub rules: Vec<Rule>,
}

/// One feed of a projection: matching events and what they change.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Only events of this source (any source when absent).
    #[serde(default)]
    pub source: Option<String>,
    /// Event type, exact or a prefix wildcard such as `order.*`.
    pub event_type: String,
    /// JSON pointer of the entity key in the raw body.
    pub key: String,
    /// JSON pointer of the event time (RFC 3339 text or Unix seconds /
    /// milliseconds); the receive time when absent.
    #[serde(default)]
    pub time: Option<String>,
    /// Status this event sets (must be in `status_precedence`).
    #[serde(default)]
    pub status: Option<String>,
    /// Fields set last-writer-wins: field name → JSON pointer.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Aggregates summing a number: field name → JSON pointer.
    #[serde(default)]
    pub sum: BTreeMap<String, String>,
    /// Aggregates counting events: field names.
    #[serde(default)]
    pub count: Vec<String>,
}

/// One change to one entity, as sent to the apply script.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Update {
    /// Projection name.
    #[serde(skip)]
    pub projection: String,
    /// Entity key.
    #[serde(skip)]
    pub key: String,
    /// Event time, Unix milliseconds.
    #[serde(skip)]
    pub time_ms: i64,
    /// The operations.
    pub ops: Vec<Op>,
}

/// A field operation. `v` is always JSON text, so Lua never parses numbers.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Op {
    /// Last-writer-wins set.
    Set { f: String, v: String },
    /// Forward-only status; `r` is the rank in the precedence.
    Status { f: String, v: String, r: usize },
    /// Add a number.
    Sum { f: String, v: String },
    /// Add one.
    Count { f: String },
}

/// Why an event that matches a rule cannot be mapped. Poison: DLQ.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MappingError {
    /// The body is not JSON.
    #[error("body is not JSON")]
    NotJson,
    /// The key pointer is absent or not a string/number.
    #[error("entity key {0} is missing or not a string/number")]
    MissingKey(String),
    /// A sum pointer points at something that is not a finite number.
    #[error("sum field {0} is not a number")]
    NotANumber(String),
}

impl ProjectionSpec {
    /// Checks the definition; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        let at = |f: &str| format!("projection[{}].{f}", self.name);
        let reserved = |f: &str| f.starts_with('~') || f.is_empty();
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "projection.name: {:?} must be non-empty [A-Za-z0-9_-]",
                self.name
            ));
        }
        if self.rules.is_empty() {
            return Err(format!("{}: at least one rule is required", at("rule")));
        }
        for r in &self.rules {
            for p in std::iter::once(&r.key)
                .chain(r.time.iter())
                .chain(r.set.values())
                .chain(r.sum.values())
            {
                if !p.is_empty() && !p.starts_with('/') {
                    return Err(format!(
                        "{}: {p:?} is not a JSON pointer (starts with '/')",
                        at("rule")
                    ));
                }
            }
            if let Some(s) = &r.status {
                if self.status_field.is_none() || !self.status_precedence.contains(s) {
                    return Err(format!(
                        "{}: status {s:?} needs status_field and must be one of status_precedence {:?}",
                        at("rule"),
                        self.status_precedence
                    ));
                }
            }
            if r.set
                .keys()
                .chain(r.sum.keys())
                .chain(r.count.iter())
                .any(|f| reserved(f))
            {
                return Err(format!(
                    "{}: field names must be non-empty and not start with '~'",
                    at("rule")
                ));
            }
        }
        Ok(())
    }

    /// Adds every JSON pointer the rules read to `paths`.
    pub fn add_pointers(&self, paths: &mut Paths) {
        for r in &self.rules {
            paths.add(&r.key);
            if let Some(t) = &r.time {
                paths.add(t);
            }
            for p in r.set.values().chain(r.sum.values()) {
                paths.add(p);
            }
        }
    }

    /// The rules matching an event's source and type.
    pub fn matching<'a>(&'a self, event: EventView<'a>) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| {
            r.source.as_deref().is_none_or(|s| s == event.source)
                && type_matches(&r.event_type, event.event_type)
        })
    }

    /// Maps an event through one rule.
    pub fn map(
        &self,
        rule: &Rule,
        event: &EventView<'_>,
        doc: Option<&Value>,
    ) -> Result<Update, MappingError> {
        let doc = doc.ok_or(MappingError::NotJson)?;
        let key = match lookup(doc, &rule.key) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(MappingError::MissingKey(rule.key.clone())),
        };
        let time_ms = rule
            .time
            .as_deref()
            .and_then(|p| lookup(doc, p))
            .and_then(parse_time_ms)
            .unwrap_or(event.received_at_ms)
            .max(0);
        let mut ops = Vec::new();
        if let (Some(status), Some(field)) = (&rule.status, &self.status_field) {
            let rank = self
                .status_precedence
                .iter()
                .position(|s| s == status)
                .unwrap_or(0);
            ops.push(Op::Status {
                f: field.clone(),
                v: Value::String(status.clone()).to_string(),
                r: rank,
            });
        }
        for (field, pointer) in &rule.set {
            // An absent optional field is simply not set by this event.
            if let Some(v) = lookup(doc, pointer) {
                ops.push(Op::Set {
                    f: field.clone(),
                    v: v.to_string(),
                });
            }
        }
        for (field, pointer) in &rule.sum {
            let n = lookup(doc, pointer).and_then(|v| match v {
                Value::Number(n) => Some(n.clone()),
                _ => None,
            });
            match n {
                Some(n) if n.as_f64().is_some_and(f64::is_finite) => ops.push(Op::Sum {
                    f: field.clone(),
                    v: n.to_string(),
                }),
                _ => return Err(MappingError::NotANumber(field.clone())),
            }
        }
        for field in &rule.count {
            ops.push(Op::Count { f: field.clone() });
        }
        Ok(Update {
            projection: self.name.clone(),
            key,
            time_ms,
            ops,
        })
    }
}

/// `order.*` matches `order.shipped`; anything else matches exactly.
pub fn type_matches(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => event_type.starts_with(prefix),
        None => pattern == event_type,
    }
}

/// RFC 3339 text, or a Unix time in seconds (< 10^11) or milliseconds.
pub fn parse_time_ms(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.timestamp_millis()),
        Value::Number(n) => {
            let x = n.as_f64()?;
            Some(if x.abs() < 1e11 {
                (x * 1000.0) as i64
            } else {
                x as i64
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use hooklog_schemas::WebhookEvent;

    use super::*;

    fn orders() -> ProjectionSpec {
        let text = r#"
            name = "orders"
            status_field = "status"
            status_precedence = ["created", "paid", "shipped", "delivered"]
            [[rule]]
            event_type = "order.*"
            key = "/order_id"
            time = "/shipped_at"
            status = "shipped"
            set = { carrier = "/shipping_carrier", missing = "/nope" }
            sum = { total = "/amount" }
            count = ["events"]
        "#;
        let spec: ProjectionSpec = toml::from_str(text).unwrap();
        spec.validate().unwrap();
        spec
    }

    fn event(body: &str) -> WebhookEvent {
        crate::test_support::event("e1", "order.shipped", body, 42)
    }

    #[test]
    fn maps_fields_status_and_aggregates() {
        let spec = orders();
        let ev = event(
            r#"{"order_id":"ORD-1","shipping_carrier":"FedEx","shipped_at":"2025-03-01T12:00:00Z","amount":12.5,"note":"unused"}"#,
        );
        let doc: Value = serde_json::from_slice(&ev.body).unwrap();
        let rule = spec.matching(ev.view()).next().unwrap();
        let up = spec.map(rule, &ev.view(), Some(&doc)).unwrap();
        // The body parsed down to the spec's pointers maps the same.
        let mut paths = Paths::default();
        spec.add_pointers(&mut paths);
        let pruned = paths.parse(&ev.body).unwrap();
        assert_ne!(pruned, doc, "something was left out");
        assert_eq!(spec.map(rule, &ev.view(), Some(&pruned)).unwrap(), up);
        assert_eq!(up.key, "ORD-1");
        assert_eq!(up.time_ms, 1_740_830_400_000);
        assert_eq!(
            up.ops,
            vec![
                Op::Status {
                    f: "status".into(),
                    v: "\"shipped\"".into(),
                    r: 2
                },
                Op::Set {
                    f: "carrier".into(),
                    v: "\"FedEx\"".into()
                },
                Op::Sum {
                    f: "total".into(),
                    v: "12.5".into()
                },
                Op::Count { f: "events".into() },
            ]
        );
    }

    #[test]
    fn poison_cases() {
        let spec = orders();
        let rule = &spec.rules[0];
        let ev = event("not json");
        assert_eq!(spec.map(rule, &ev.view(), None), Err(MappingError::NotJson));
        let doc = serde_json::json!({"amount": 1});
        assert!(matches!(
            spec.map(rule, &ev.view(), Some(&doc)),
            Err(MappingError::MissingKey(_))
        ));
        let doc = serde_json::json!({"order_id": "x", "amount": "12"});
        assert!(matches!(
            spec.map(rule, &ev.view(), Some(&doc)),
            Err(MappingError::NotANumber(_))
        ));
    }

    #[test]
    fn time_fallback_and_type_patterns() {
        assert!(type_matches("order.*", "order.created"));
        assert!(!type_matches("order.*", "orders"));
        assert!(type_matches("charge.succeeded", "charge.succeeded"));
        assert_eq!(
            parse_time_ms(&serde_json::json!(1_740_830_400)),
            Some(1_740_830_400_000)
        );
        assert_eq!(
            parse_time_ms(&serde_json::json!(1_740_830_400_123i64)),
            Some(1_740_830_400_123)
        );
        let spec = orders();
        let ev = event("{}");
        let doc = serde_json::json!({"order_id": 7, "amount": 1});
        let up = spec.map(&spec.rules[0], &ev.view(), Some(&doc)).unwrap();
        assert_eq!((up.key.as_str(), up.time_ms), ("7", 42));
    }

    #[test]
    fn validation_names_the_field() {
        let mut spec = orders();
        spec.rules[0].status = Some("lost".into());
        assert!(spec
            .validate()
            .unwrap_err()
            .contains("projection[orders].rule"));
    }
}
