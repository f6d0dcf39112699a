//! The `WebhookEvent` Avro record (`schemas/webhook_event.avsc`) and its codec.
//!
//! Records use Avro *single-object encoding*: `C3 01`, the 8-byte CRC-64-AVRO
//! (Rabin) fingerprint of the writer schema, then the binary datum. The
//! fingerprint names the writer schema, so a reader can resolve old records
//! against a newer reader schema (see `docs/schema-evolution.md`).

use std::sync::LazyLock;

use apache_avro::rabin::Rabin;
use apache_avro::types::Value;
use apache_avro::Schema;

/// The schema text, compiled into both binaries.
pub const SCHEMA_JSON: &str = include_str!("../webhook_event.avsc");

static SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(SCHEMA_JSON).expect("webhook_event.avsc is valid Avro"));

static FINGERPRINT: LazyLock<Vec<u8>> = LazyLock::new(|| SCHEMA.fingerprint::<Rabin>().bytes);

const MAGIC: [u8; 2] = [0xC3, 0x01];

/// One verified webhook, as published by ingest to the raw topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEvent {
    /// Event id; also the Kafka record key.
    pub event_id: String,
    /// Configured source name.
    pub source: String,
    /// Signature scheme id that verified it.
    pub scheme: String,
    /// Provider event type, `""` when none.
    pub event_type: String,
    /// The raw body, byte for byte.
    pub body: Vec<u8>,
    /// Headers needed to re-verify (lower-case names).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Signed timestamp (Unix seconds) of timestamped schemes.
    pub provider_timestamp: Option<i64>,
    /// Receive time, Unix milliseconds.
    pub received_at_ms: i64,
    /// Index of the secret that verified (never the secret itself).
    pub key_id: i32,
}

/// Why a record value could not be decoded. Such records are poison: they go
/// to the DLQ, because retrying would fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not single-object encoded.
    #[error("not an Avro single-object record (bad magic)")]
    BadMagic,
    /// Written with a schema this build does not know.
    #[error("unknown writer schema fingerprint")]
    UnknownSchema,
    /// The datum does not match the schema.
    #[error("invalid Avro datum: {0}")]
    Datum(String),
}

impl WebhookEvent {
    /// The parsed writer/reader schema.
    pub fn schema() -> &'static Schema {
        &SCHEMA
    }

    /// Encodes as an Avro single-object record.
    pub fn encode(&self) -> Vec<u8> {
        let headers = self
            .headers
            .iter()
            .map(|(n, v)| {
                Value::Record(vec![
                    ("name".into(), Value::String(n.clone())),
                    ("value".into(), Value::Bytes(v.clone())),
                ])
            })
            .collect();
        let ts = match self.provider_timestamp {
            Some(t) => Value::Union(1, Box::new(Value::Long(t))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        let record = Value::Record(vec![
            ("event_id".into(), Value::String(self.event_id.clone())),
            ("source".into(), Value::String(self.source.clone())),
            ("scheme".into(), Value::String(self.scheme.clone())),
            ("event_type".into(), Value::String(self.event_type.clone())),
            ("body".into(), Value::Bytes(self.body.clone())),
            ("headers".into(), Value::Array(headers)),
            ("provider_timestamp".into(), ts),
            ("received_at_ms".into(), Value::Long(self.received_at_ms)),
            ("key_id".into(), Value::Int(self.key_id)),
        ]);
        let datum = apache_avro::to_avro_datum(&SCHEMA, record)
            .expect("a WebhookEvent always matches its own schema");
        let mut out = Vec::with_capacity(10 + datum.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FINGERPRINT);
        out.extend_from_slice(&datum);
        out
    }

    /// Decodes a single-object record written with a known schema.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < 10 || bytes[..2] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        // Only one schema version exists so far; a new version adds its
        // fingerprint here and is resolved against the reader schema.
        if bytes[2..10] != FINGERPRINT[..] {
            return Err(DecodeError::UnknownSchema);
        }
        let mut datum = &bytes[10..];
        let value = apache_avro::from_avro_datum(&SCHEMA, &mut datum, None)
            .map_err(|e| DecodeError::Datum(e.to_string()))?;
        if !datum.is_empty() {
            return Err(DecodeError::Datum("trailing bytes after the record".into()));
        }
        Self::from_value(value)
    }

    fn from_value(value: Value) -> Result<Self, DecodeError> {
        let bad = |what: &str| DecodeError::Datum(format!("field {what} has the wrong type"));
        let Value::Record(fields) = value else {
            return Err(bad("<record>"));
        };
        let mut ev = WebhookEvent {
            event_id: String::new(),
            source: String::new(),
            scheme: String::new(),
            event_type: String::new(),
            body: Vec::new(),
            headers: Vec::new(),
            provider_timestamp: None,
            received_at_ms: 0,
            key_id: 0,
        };
        for (name, v) in fields {
            match (name.as_str(), v) {
                ("event_id", Value::String(s)) => ev.event_id = s,
                ("source", Value::String(s)) => ev.source = s,
                ("scheme", Value::String(s)) => ev.scheme = s,
                ("event_type", Value::String(s)) => ev.event_type = s,
                ("body", Value::Bytes(b)) => ev.body = b,
                ("headers", Value::Array(items)) => {
                    for item in items {
                        let Value::Record(kv) = item else {
                            return Err(bad("headers"));
                        };
                        let mut it = kv.into_iter();
                        match (it.next(), it.next()) {
                            (Some((_, Value::String(n))), Some((_, Value::Bytes(v)))) => {
                                ev.headers.push((n, v))
                            }
                            _ => return Err(bad("headers")),
                        }
                    }
                }
                ("provider_timestamp", Value::Union(_, inner)) => {
                    ev.provider_timestamp = match *inner {
                        Value::Long(t) => Some(t),
                        _ => None,
                    }
                }
                ("received_at_ms", Value::Long(t)) => ev.received_at_ms = t,
                ("key_id", Value::Int(k)) => ev.key_id = k,
                (other, _) => return Err(bad(other)),
            }
        }
        Ok(ev)
    }

    /// The value of a stored request header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WebhookEvent {
        WebhookEvent {
            event_id: "evt_1".into(),
            source: "stripe".into(),
            scheme: "stripe".into(),
            event_type: "charge.succeeded".into(),
            body: vec![0xff, 0x00, b'{', b' ', b'}'],
            headers: vec![("stripe-signature".into(), b"t=1,v1=ab".to_vec())],
            provider_timestamp: Some(1_735_689_600),
            received_at_ms: 1_735_689_600_123,
            key_id: 1,
        }
    }

    #[test]
    fn round_trips_non_utf8_body() {
        let ev = sample();
        let bytes = ev.encode();
        assert_eq!(&bytes[..2], &MAGIC);
        assert_eq!(WebhookEvent::decode(&bytes).unwrap(), ev);
        assert_eq!(ev.header("Stripe-Signature"), Some(&b"t=1,v1=ab"[..]));
    }

    #[test]
    fn round_trips_without_timestamp() {
        let ev = WebhookEvent {
            provider_timestamp: None,
            headers: vec![],
            ..sample()
        };
        assert_eq!(WebhookEvent::decode(&ev.encode()).unwrap(), ev);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            WebhookEvent::decode(b"garbage!!!!!"),
            Err(DecodeError::BadMagic)
        ));
        let mut bytes = sample().encode();
        bytes[5] ^= 0xff;
        assert!(matches!(
            WebhookEvent::decode(&bytes),
            Err(DecodeError::UnknownSchema)
        ));
        let bytes = sample().encode();
        assert!(WebhookEvent::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
